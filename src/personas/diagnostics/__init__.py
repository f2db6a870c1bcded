"""The diagnostics feature: what temperature does — next-token distributions, where samples
branch, and how varied they are."""
