"""Typer command-line interface. Modules here import torch only inside commands."""
