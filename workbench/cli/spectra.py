"""``python -m workbench spectra MODEL``: singular values of every compressible layer."""
from workbench.cli.model_source import add_model_arguments, load_task
from workbench.cli.output import emit
from workbench.spectra import model_spectra


def run(args) -> int:
    task = load_task(args)
    spectra = model_spectra(task.model)
    lines = [f"{s.name:20s} {str(s.shape):14s} effective rank {s.effective_rank:7.1f}  "
             f"sigma_1 {float(s.singular_values[0]):.3f}" for s in spectra]
    emit({"model": args.model, "layers": [s.to_dict() for s in spectra]}, args.json, "\n".join(lines))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("spectra", help="singular values of each layer")
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)
