"""Running a grid to completion: a request's cells and rows (request), prompts files
(prompts_file), and the grid spread over Ray workers (ray)."""
