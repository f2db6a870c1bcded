"""From a row to its next token: the grid of rows and their seeds (grid, no torch), the token
chooser (Gumbel-max noise keyed by seed, step and token id), and the per-row logits rules
applied before the choice (rules)."""
