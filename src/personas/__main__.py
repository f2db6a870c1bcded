from personas.cli import run

run()
