"""``napari-hdn export-bmz``: a model as a BioImage Model Zoo package, tested by bioimageio.core."""

from __future__ import annotations

from ._common import EXIT_OK, CLIError, check_numbers, check_outputs, read_tiff, resolve_axes


def add_parser(sub) -> None:
    e = sub.add_parser(
        "export-bmz", help="write a model as a BioImage Model Zoo package (zip)",
        description="Write MODEL as a bioimage.io model package: rdf.yaml (bioimageio.spec 0.5), "
        "weights (pytorch_state_dict; the architecture is napari-hdn's), a test input cut from "
        "IMAGE with its MMSE and variance, a cover, a README and the noise model. The package is "
        "tested with bioimageio.core before it is written. Needs `pip install "
        "\"napari-hdn[bmz]\"`. `napari-hdn predict PACKAGE.zip ...` reads it back.")
    e.add_argument("model", help="model file (.hdn) from `napari-hdn train`")
    e.add_argument("--image", required=True,
                   help="noisy TIFF like the training data (the test input is a crop of its first "
                   "frame)")
    e.add_argument("--out", required=True, help="the package to write (.zip)")
    e.add_argument("--axes", help="axes of IMAGE, e.g. YX, ZYX (default: the file's, else guessed)")
    e.add_argument("--samples", type=int, default=32,
                   help="posterior samples per MMSE in the package (default 32)")
    e.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    e.add_argument("--name", help="the model's name in the zoo (default: from the file name)")
    e.add_argument("--author", action="append", dest="authors", metavar="NAME",
                   help="an author (repeat for several; default 'napari-hdn user')")
    e.add_argument("--license", default="CC-BY-4.0",
                   help="licence of the model (SPDX id, default CC-BY-4.0)")
    e.add_argument("--no-test", action="store_true",
                   help="skip bioimageio.core's model test (not recommended)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=run)


def run(args) -> int:
    from ..engine import load_model
    from ..engine.bmz import _need_spec, export_bmz
    from ..engine.network.multichannel import MultiChannelModel

    check_numbers(args, n_samples="samples", seed="seed")
    _need_spec()  # before the model and the image are read
    check_outputs([(args.out, "package")], [args.model, args.image], args.overwrite)
    model = load_model(args.model)
    if isinstance(model, MultiChannelModel):
        raise CLIError(f"{args.model} holds one model per channel ({model.channels}); BioImage "
                       "Model Zoo export takes a one-channel model")
    image, declared = read_tiff(args.image, "image", with_axes=True)
    axes = resolve_axes(args.axes, declared, args.image)
    rep = export_bmz(model, args.out, image, axes=axes, n_samples=args.samples, seed=args.seed,
                     name=args.name, authors=args.authors, license=args.license,
                     validate=not args.no_test, overwrite=args.overwrite, source_path=args.model)
    for line in rep.lines():
        print(line)
    return EXIT_OK
