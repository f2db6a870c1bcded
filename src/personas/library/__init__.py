"""The persona file: its schema, its games, file:line messages, and finding and reading it.

Pure Python and pydantic: nothing here imports torch or transformers (an import-linter
contract in pyproject.toml keeps it so), so `personas list` and `render --raw` start fast.
"""
