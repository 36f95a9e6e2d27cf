"""Command line interface (typer): the top layer, it depends on everything else and nothing depends on it."""
