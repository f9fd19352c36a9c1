"""``ronan-fast profile``: fit a model's belonging profile and save it."""

from __future__ import annotations

import time
from pathlib import Path

from ronan_fast import distributed
from ronan_fast.cli import sharded
from ronan_fast.cli.common import (
    EXIT_CODES_TEXT,
    EXIT_OK,
    UsageError,
    add_common_args,
    add_inversion_args,
    at_least_one,
    check_output,
    err,
    nonnegative_int,
    para,
    positive_int,
    setting_overrides,
    setup_device,
)
from ronan_fast.cli.models import add_model_args, models
from ronan_fast.cli.progress import Progress
from ronan_fast.edits import EDIT_HELP, RANDOM_EDITS, check_edit, check_edit_metric


def add_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "profile", formatter_class=fmt,
        help="fit a model's belonging profile and save it as JSON",
        description=para("Generate N images with the model, invert them with the model and the reference model, and "
                    "save the mean and standard deviation of their calibrated reconstruction losses (the "
                    "belonging profile) with everything that made them. The images are inverted in parts; "
                    "each finished part is saved to PROFILE.json.partial.json, and running the same command again "
                    "after an interruption resumes after the last one (the file is removed once the profile "
                    "is saved)."),
        epilog=(
            "examples:\n"
            "  ronan-fast profile --model default -o default.json\n"
            "  ronan-fast profile --model mygan.models:make_generator --weights g.pt --latent-shape 100 1 1 \\\n"
            "      --reference mygan.models:make_reference --reference-weights r.pt -n 100 -o mygan.json\n"
            "  ronan-fast profile --model default --settings authors --rule grubbs -o paper.json   # the paper's setup\n"
            "  ronan-fast profile --model default --edit jpeg75 -o default-jpeg75.json   # for JPEG-75 copies\n"
            "  ronan-fast profile --model onestep-fmnist -o onestep.json   # a model of the package's zoo\n\n"
            + EXIT_CODES_TEXT
        ),
    )
    add_model_args(p, "default")
    add_inversion_args(p)
    p.add_argument("-n", type=positive_int, default=100, help="number of generated profile images (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the profile images (default: 0)")
    p.add_argument("--inversion-seed", type=int, default=0, help="seed of the inversion's starting points (default: 0)")
    p.add_argument("--part", type=positive_int, default=50, metavar="N",
                   help="profile images per saved part: an interruption loses at most one part, smaller "
                        "parts batch less well (default: 50)")
    p.add_argument("--retries", type=int, default=2, metavar="ROUNDS",
                   help="rounds of inverting again, from other starts, the profile images that fail the "
                        "belonging test against the rest of the profile (inversions that missed); "
                        "0: none, as in the paper (default: 2)")
    p.add_argument("--edit", metavar="EDIT",
                   help=f"edit the profile images before inverting them, for images known to reach you so edited: {EDIT_HELP}")
    p.add_argument("--warm-start", nargs="?", const="auto", choices=("auto", "encoder", "mapping", "autoencoder"),
                   default=None, metavar="{encoder,mapping,autoencoder}",
                   help="start each image's inversion at a guess (the other starts stay random). encoder: a "
                        "learned encoder's guess; the encoder is trained on the model's own samples and saved "
                        "beside the profile as PROFILE.encoder.safetensors (reused when one for this model and "
                        "recipe is already there). mapping: for a StyleGAN-style model (a module with mapping_net "
                        "and synthesis), the image inverted over w, then the mapping solved for z; nothing trained. "
                        "autoencoder: for a latent-diffusion decoder (a diffusers autoencoder folder), its "
                        "autoencoder's own encoder; nothing trained. A bare --warm-start is autoencoder for a "
                        "latent-diffusion decoder, mapping for a StyleGAN-style model and encoder for any other "
                        "model. inspect then uses the same "
                        "start. Without --settings, GANs, VAEs (latent-diffusion decoders too) and conditional "
                        "models are then inverted with their lean warm-start default (4 screened starts, 300 "
                        "steps); docs/inversion.md#learned-warm-starts")
    p.add_argument("--w-encoder", action="store_true",
                   help="with --warm-start mapping: also train an encoder from images to w on the model's own "
                        "samples (saved beside the profile as PROFILE.encoder.safetensors, reused as with "
                        "--warm-start encoder); its guess is the first start of the search over w")
    p.add_argument("--w-set", action="append", default=[], metavar="FIELD=VALUE", dest="w_set_fields",
                   help="with --warm-start mapping: override a field of the search over w's settings "
                        "(ronan_fast.mapping_start.W_SETTINGS: the GAN default with 300 Adam steps), e.g. "
                        "--w-set restarts=48; recorded in the profile, which inspect follows; repeatable")
    p.add_argument("--w-space", choices=("whitened", "w"), default=None,
                   help="with --warm-start mapping: the coordinates of the search over w: whitened by the "
                        "mapping's mean and covariance (the default), or w itself (as profiles made before the "
                        "choice); recorded in the profile, which inspect follows")
    p.add_argument("--w-first-steps", type=nonnegative_int, default=None, metavar="N",
                   help="with --warm-start mapping --w-encoder: Adam steps of a first search over w from the "
                        "encoder's guess alone, which settles an image once its loss over w is under 1/20 of its "
                        "threshold (when attributing with early stop; the others get the full search); 0: the "
                        "full search for every image (default: 50); recorded in the profile")
    p.add_argument("--w-full-to-end", action="store_true",
                   help="with --warm-start mapping --w-encoder: run the full search over w (for the images the "
                        "first search leaves above) to its end, as profiles made before the option did, instead "
                        "of stopping each image once under 1/20 of its threshold and letting go of rows levelled "
                        "off far above it; recorded in the profile")
    p.add_argument("--w-full-within", type=at_least_one, default=None, metavar="X",
                   help="with --warm-start mapping --w-encoder: when attributing with early stop, only the images "
                        "the first search over w leaves within X times their threshold get the full search too "
                        "(the others, far above, are settled by the first search); inf (the default): every image "
                        "it leaves above 1/20 of its threshold; recorded in the profile")
    p.add_argument("--w-settle-above", type=at_least_one, default=None, metavar="X",
                   help="with --warm-start mapping: when attributing with early stop, an image whose search over "
                        "w ends above X times its threshold is settled above it there, without the search over z "
                        "(its loss is that of its start's guess, and its report says so) (default: 4); inf: every "
                        "image is searched over z; recorded in the profile, which inspect follows")
    p.add_argument("--solve-choice", choices=("metric", "loss"), default=None,
                   help="with --warm-start mapping: which of the solve's draws of z is the start over z: the one "
                        "with the lowest error in the solve's metric (metric, the default) or the one whose image "
                        "is closest to the image (loss: one generator call over the draws); recorded in the "
                        "profile, which inspect follows")
    p.add_argument("--encoder-samples", type=positive_int, default=None, metavar="N",
                   help="with --warm-start encoder or --w-encoder: the model's samples the encoder learns from "
                        "(default: 8192; with --w-encoder 32768)")
    p.add_argument("--encoder-steps", type=positive_int, default=None, metavar="N",
                   help="with --warm-start encoder or --w-encoder: the encoder's training steps (default: 1000; "
                        "with --w-encoder 8000, the last twentieth of them also on the image)")
    p.add_argument("-o", "--output", required=True, metavar="PROFILE.json", help="where to write the profile")
    p.add_argument("--wait", action="store_true",
                   help="if another run is writing the same profile, wait for it instead of stopping (exit code 4)")
    add_common_args(p)


def _auto_warm_start(model) -> str:
    """What a bare ``--warm-start`` means for ``model``: the start made from the model itself
    where it has one (a latent-diffusion decoder's autoencoder; a StyleGAN's mapping network,
    which converged 15 of 16 own images of the tuning half's StyleGAN where a learned encoder
    converged 1: bench/results/heldout_tuning_mapping.md), else a learned encoder."""
    from ronan_fast.autoencoder_start import has_own_encoder
    from ronan_fast.mapping_start import has_mapping_network

    if has_own_encoder(model):
        return "autoencoder"
    return "mapping" if has_mapping_network(model) else "encoder"


def run(args) -> int:
    from ronan_fast.attributor import Attributor
    from ronan_fast.reports.files import ReportLock

    out = check_output(args.output, "-o", (".json",))
    worker = sharded.join(args, "profile", out)  # under torchrun: this worker (its device in args.device)
    device = setup_device(args)
    if args.retries < 0:
        raise UsageError(f"--retries {args.retries}: expected a number of rounds >= 0")
    if args.n < 3:
        raise UsageError(f"-n {args.n}: a Grubbs test needs at least 3 profile images (the paper uses 100)")
    if args.edit is not None:
        try:
            check_edit(args.edit, "--edit")
            check_edit_metric(args.edit, args.metric, "--edit", "--metric")
        except ValueError as e:
            raise UsageError(str(e)) from None
    model, reference = models(args)
    encoder = None
    kind = args.warm_start
    if kind == "auto":
        kind = _auto_warm_start(model)
    for flag, given in (("--w-encoder", args.w_encoder), ("--w-set", args.w_set_fields),
                        ("--w-space", args.w_space), ("--w-first-steps", args.w_first_steps is not None),
                        ("--w-settle-above", args.w_settle_above is not None),
                        ("--solve-choice", args.solve_choice is not None),
                        ("--w-full-to-end", args.w_full_to_end),
                        ("--w-full-within", args.w_full_within is not None)):
        if given and kind != "mapping":
            raise UsageError(f"{flag} goes with --warm-start mapping (a StyleGAN-style model), not with "
                             f"--warm-start {kind}" if kind else f"{flag} goes with --warm-start mapping")
    if kind == "encoder":
        encoder = _warm_start(model, args, out, device)
    elif kind is not None:  # made from the model itself
        from ronan_fast.autoencoder_start import autoencoder_start
        from ronan_fast.mapping_start import W_ENCODER_RECIPE, W_SETTINGS, mapping_start, train_w_encoder

        build = {"autoencoder": autoencoder_start, "mapping": mapping_start}[kind]
        kw = {}
        if args.w_set_fields:
            try:
                kw["w_settings"] = W_SETTINGS.replace(**setting_overrides(args.w_set_fields, {}, "--w-set"))
            except ValueError as e:
                raise UsageError(f"--w-set: {e}") from None
        if args.w_space is not None:
            kw["w_space"] = args.w_space
        # the first search over w, and the full search that follows it, start from the encoder's guess
        follows = "the full search follows the first search from its guess"
        for flag, given, key, value, why in (
                ("--w-first-steps", args.w_first_steps is not None, "w_first_steps", args.w_first_steps,
                 "the first search over w starts from its guess"),
                ("--w-full-to-end", args.w_full_to_end, "w_full_stops", False, follows),
                ("--w-full-within", args.w_full_within is not None, "w_full_within", args.w_full_within, follows)):
            if given:
                if not args.w_encoder:
                    raise UsageError(f"{flag} goes with --w-encoder: {why}")
                kw[key] = value
        if args.w_settle_above is not None:
            kw["w_settle_above"] = args.w_settle_above
        if args.solve_choice is not None:
            kw["solve_choice"] = args.solve_choice
        try:
            encoder = build(model.to(device) if device is not None else model, **kw)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--warm-start {kind}: {e}") from None
        if args.w_encoder:
            start = encoder
            w_enc = _warm_start(start.w_generator, args, out, device,
                                train_fn=lambda **recipe: train_w_encoder(start, **recipe), what="an encoder of w",
                                base_recipe=W_ENCODER_RECIPE)
            encoder = start.with_w_encoder(w_enc)
    overrides = {k: getattr(args, k) for k in ("steps", "restarts", "lr", "precision") if getattr(args, k) is not None}
    overrides.update(setting_overrides(args.set_fields, overrides))
    # random tone edits spread the profile over decades, which the log rule turns into false
    # positives (docs/edits.md): the paper's rule unless one is asked for
    rule = "grubbs" if args.rule is None and args.edit in RANDOM_EDITS else args.rule
    try:
        att = Attributor(model, reference, alpha=args.alpha, metric=args.metric, rule=rule,
                         settings=args.settings, seed=args.inversion_seed, device=device, cuda_graph=args.cuda_graph,
                         compile_generator=args.compile_generator, call_rows=args.call_rows, max_rows=args.max_rows,
                         profile_retries=args.retries, name=args.name, warm_start=encoder, **overrides)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    if worker is not None:
        return sharded.profile(worker, att, args, out)
    t0 = time.perf_counter()
    with ReportLock(out, wait=args.wait):
        try:
            profile = _fit(att, args, out)
        except ValueError as e:  # what the model makes (its range, its outputs) is not usable
            raise UsageError(str(e)) from None
        profile.save(out)
        sharded.remove_parts(out)  # OUT.partial.json, and OUT.parts/ of a job spread over workers
    print(profile.describe())
    print(f"saved {out} ({time.perf_counter() - t0:.1f} s)")
    return EXIT_OK


def _warm_start(model, args, out: Path, device, train_fn=None, what: str = "a warm-start encoder",
                base_recipe: dict | None = None):
    """The encoder of ``--warm-start`` (or of ``--w-encoder``: ``model`` is then the synthesis
    network over ``w``, ``train_fn`` trains for it and ``base_recipe`` is its recipe): the one
    beside the profile when it was trained for this model with this recipe, else one trained now
    (on rank 0 under torchrun) and saved there. ``--encoder-samples``/``--encoder-steps`` replace
    the recipe's (:func:`~ronan_fast.warmstart.train_encoder`'s defaults without one); with
    ``base_recipe``, its image steps keep their share of the steps."""
    import inspect

    from ronan_fast.warmstart import EncoderError, EncoderMismatchError, encoder_path, load_encoder, train_encoder

    train_fn = train_fn or (lambda **recipe: train_encoder(model, **recipe))

    path = check_output(encoder_path(out), "--warm-start (the encoder file)", (".safetensors",))
    if device is not None:
        model.to(device)
    base = base_recipe or {}
    defaults = inspect.signature(train_encoder).parameters
    recipe = {"samples": defaults["samples"].default, "steps": defaults["steps"].default, **base}
    if args.encoder_samples is not None:
        recipe["samples"] = args.encoder_samples
    if args.encoder_steps is not None:
        recipe["steps"] = args.encoder_steps
    if "image_steps" in base and recipe["steps"] != base["steps"]:
        recipe["image_steps"] = recipe["steps"] * base["image_steps"] // base["steps"]

    def usable():
        if not path.exists():
            return None
        try:
            enc = load_encoder(path, model)
        except EncoderMismatchError as e:
            raise UsageError(f"{path} holds an encoder for another model ({e}); remove it to train one") from None
        except EncoderError as e:
            raise UsageError(f"--warm-start: {e}; remove it to train one") from None
        return enc if all(enc.recipe.get(k) == v for k, v in recipe.items()) else None

    def train():
        if usable() is not None:
            return
        if not args.quiet:
            err(f"training {what} for {args.name or model.name} on {recipe['samples']} of its "
                f"samples, {recipe['steps']} steps")
        t0 = time.perf_counter()
        train_fn(**recipe).save(path)
        if not args.quiet:
            err(f"encoder saved to {path} ({time.perf_counter() - t0:.0f} s)")

    distributed.on_rank0(train)
    return usable()


def _fit(att, args, out: Path):
    """The fit, its finished parts kept in OUTPUT.partial.json for a resume."""
    from ronan_fast.attributor import CheckpointError

    if distributed.parts_dir(out).is_dir():  # left by a job spread over workers: resume from its parts
        return sharded.fit(att, args, out)
    partial = Path(f"{out}.partial.json")
    progress = Progress(args.quiet, args.n, "profile")

    def fit():
        return att.fit(n=args.n, seed=args.seed, progress=progress.part(0, att.stages()), edit=args.edit,
                       checkpoint=partial, checkpoint_every=args.part)

    try:
        try:
            return fit()
        except CheckpointError:
            err(f"note: {partial} was left by a profile run with other options (or is unreadable); "
                "starting afresh")
            partial.unlink()
            return fit()
    except KeyboardInterrupt:
        progress.close()
        if partial.exists():
            err(f"interrupted; the finished parts are in {partial}; run the same command again to resume")
        raise
    finally:
        progress.close()
