"""``iqa`` subcommands: each module has ``register(subparsers)``, and imports heavy code lazily."""
