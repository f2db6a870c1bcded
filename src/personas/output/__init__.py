"""What users read: samples as a table, JSONL, JSON or CSV; transcripts and game reports;
diagnostics; plots; and files written without losing what was there. No model code."""
