"""`python -m server`: the same as `cacheaside serve`."""

from client.cli import main

raise SystemExit(main(["serve", *__import__("sys").argv[1:]]))
