"""The generate feature: a request's cells and grid, prompts files, and `serve --stdio`."""
