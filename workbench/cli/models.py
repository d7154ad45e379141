"""``python -m workbench models``: list the embedded models."""
from workbench.cli.output import emit
from workbench.zoo import available_models


def run(args) -> int:
    models = available_models()
    text = "\n".join(f"{name:14s} {description}" for name, description in models.items())
    emit({"models": [{"name": n, "description": d} for n, d in models.items()]}, args.json, text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the embedded models")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)
