"""Named inversion settings (presets) and each generator family's default.

``resolve_settings(generator, settings, **overrides)`` says which settings an inversion uses:
a preset's name, an :class:`~ronan_fast.inversion.settings.InversionSettings`, or (``None`` /
``"default"``) the default of the generator's family, with any overrides applied. The comments
say what each default was chosen on; docs/inversion.md has the tables.
"""

from __future__ import annotations

from ronan_fast.adapters import GeneratorAdapter
from ronan_fast.inversion.settings import InversionSettings

__all__ = ["PRESETS", "FAMILY_DEFAULTS", "FALLBACK_DEFAULT", "WARM_DEFAULTS", "SEARCHED_GUESS_FIELDS",
           "resolve_settings"]

#: Named settings. "authors" is the paper's code: one start, 1500 Adam steps at lr 0.1, the plain
#: loss (``clip_aware=False``).
#: "stagewise" inverts a multi-step sampler step by step (:mod:`ronan_fast.inversion.stagewise`; others
#: get these settings end to end): its last step from two starts at the forward process
#: (one Adam step), each polished by Gauss-Newton (GMRES, then CG) for up to 80 steps; the
#: earlier steps solved exactly. On the zoo's 6-step DDIM sampler it takes the model's own
#: images from a median of 1.8e-4 (end to end) to 1.8e-7 (1.9e-9 to 2.6e-5), and held-out
#: real images as low or lower, half of them to 1e-14
#: (bench/results/convergence_cpu_ddim_stagewise.md).
PRESETS: dict[str, InversionSettings] = {
    "authors": InversionSettings(
        steps=1500, lr=0.1, restarts=1, schedule="constant", min_lr_frac=0.0, halving_every=0, min_rows=1,
        patience=0, polish_steps=0, settle_patience=0, polish_escalate=0, clip_aware=False,
    ),
}
#: Default settings per generator family (see the README for the benchmark behind them).
#: "gan": chosen on bench/results/convergence_cpu.md. On the 64x64, nz=100 DCGAN
#: (dcgan64-photos) the paper's single start converges on 56% of the model's own images; 8
#: starts halved every 100 steps over 600 cosine steps, then 25 Levenberg-Marquardt steps on
#: each image's best input, converge on all of them in less wall time per image than the
#: authors' one-image loop. Attributing with a threshold, a polished row still over 4x it whose
#: loss fell by less than 20% over 6 steps leaves the polish (``settle_patience``): on that
#: DCGAN's per-step polish trajectories (bench/results/polish_plateau_dcgan64_cpu.md) its own
#: images over 4x the line had fallen to at most 0.48x their loss 6 steps before, real images
#: to no less than 0.91x, so real images stop after 6 polish steps instead of 25.
#: 8 starts halved every 100 steps converged 200 of one draw of 200 of its images but 195 and 197
#: of two others (6 of the 8 misses as high as real images: every start the halving kept was in
#: another basin). Per-start trajectories of such images (bench/results/start_selection_dcgan64_cpu.md)
#: show the start that ends lowest among the best few by step 25 for all but one, so the GAN
#: default starts 24 and halves every 25 steps (2104 row-steps per image against 1985): 200 of
#: 200 on that draw and 199 of 200 on the third, held out from the choice, in about the same time
#: (bench/results/convergence_cpu_dcgan64_r24_n200.md). Attributing with a
#: threshold, an image whose polished start ends above it but within 4x of it has two more
#: polished (``polish_escalate``, as for one-step models). The earlier default is the preset
#: "gan-8-starts".
FAMILY_DEFAULTS: dict[str, InversionSettings] = {
    "gan": InversionSettings(),
    # "consistency": one-step generators whose latent is as wide as the image (a consistency
    # model's f(x_T, T), a distilled one-step sampler). Chosen on the zoo's one-step student
    # (bench/results/convergence_cpu_onestep*.md): Adam leaves the model's own images near 1e-4,
    # where real images also end; nearly exact Gauss-Newton steps (100 CG iterations each) take
    # its own images on to 1e-7 and below while real ones level off above 1e-6. At equal
    # generator passes, 10 CG iterations per step separated far less than 40 or 100
    # (polish_probe_onestep_cpu.md). 20 polish steps left 2 of 32 own images above every real
    # one: they were slow, not stuck, so the polish runs up to 80 steps, and a row stops once its
    # loss fell by less than 20% over 10 steps (real images level off after about 20 steps; own
    # images keep falling), or once under the belonging threshold when attributing. 20% rather
    # than 30%: 96.0% against 95.0% of 200 own images converged, real losses unchanged
    # (convergence_cpu_onestep_drop20*.md), for about a tenth more time. Before it, a
    # GMRES phase (30 Jacobian-vector products a step, about a quarter of a CG step's time) solves
    # about a third of the own images outright and takes most of the rest further; only the rows
    # it leaves unsolved go on to CG (bench/results/polish_plateau_onestep_gmres_cpu.md,
    # convergence_cpu_onestep_gmres.md: 90.6% converged and worst own 2.6e-7, against 84.4% and
    # 1.2e-6 for the CG polish alone on the same 32 + 32 images). The images still left
    # unconverged are unlucky in their starts, not unreachable (each converged from another
    # seed), so each image's two best Adam rows are polished and the lower result kept: 98.5%
    # against 96.0% of 200 own images converged, worst own 1.4e-7 against 2.5e-6, now below the
    # lowest real image (convergence_cpu_onestep_c2_n200.md), for 1.2x to 1.7x the time.
    # Attributing with a threshold (early stop), an image whose two polished starts end above it
    # but within 4x of it has two more polished: 100% of the 200 converged against 98.5%, own
    # images in 0.98x the authors' loop's time and 1.29x with real ones, against 1.46x
    # (convergence_cpu_onestep_esc2_n200.md, convergence_cpu_onestep_verdict_n200.md).
    "consistency": InversionSettings(
        steps=600, lr=0.1, restarts=8, schedule="cosine", min_lr_frac=0.01, halving_every=100,
        halving_keep=0.5, min_rows=2, patience=300, rel_tol=1e-3, polish_steps=80, polish_method="cg",
        polish_cg_iters=100, polish_patience=10, polish_min_drop=0.2, polish_gmres_iters=30,
        polish_candidates=2, polish_escalate=2, settle_patience=0,
    ),
}
#: the GAN family default until 24 starts replaced it: 8 starts halved every 100 steps, no escalation
PRESETS["gan-8-starts"] = FAMILY_DEFAULTS["gan"].replace(restarts=8, halving_every=100, polish_escalate=0)
PRESETS["stagewise"] = FAMILY_DEFAULTS["consistency"].replace(
    steps=1, restarts=2, halving_every=0, patience=0, polish_patience=0, stagewise=True)
FALLBACK_DEFAULT = InversionSettings(
    steps=1500, lr=0.1, restarts=8, schedule="cosine", min_lr_frac=0.01, halving_every=150,
    halving_keep=0.5, min_rows=2, patience=300, rel_tol=1e-3, polish_steps=0, settle_patience=0, polish_escalate=0,
)


#: "conditional" (class-conditional generators, each class searched): the fallback's Adam phase,
#: then the GAN family's polish (25 dense Levenberg-Marquardt steps on each image's best start;
#: with a threshold the settle rule and escalation). Chosen on the tuning half of the generator
#: benchmark: on the 64x64 class-conditional DCGAN (condgan64-digits) Adam alone left all 16 own
#: 8-bit images above the convergence line (worst 6.7x it), the polish took all 16 under it, in
#: the same time to the verdict (bench/results/heldout_tuning.md).
FAMILY_DEFAULTS["conditional"] = FALLBACK_DEFAULT.replace(
    polish_steps=25, polish_method="dense", settle_patience=6, polish_escalate=2)

#: The default of a family when each image's first start is a learned guess (a generator with
#: ``guided_starts``: :class:`~ronan_fast.warmstart.WarmStarted`, ``Attributor(warm_start=...)``,
#: ``profile --warm-start``): 4 starts (the guess and the 3 best of 24 draws screened by one
#: forward pass), 300 cosine Adam steps halved every 50, then the family's polish. Chosen on the
#: tuning half of the generator benchmark (bench/results/heldout_tuning.md; 16 own 8-bit images
#: and 4 real ones per generator, run to the verdict): on the two GANs every own image converged,
#: as with the family default, in 3.5x and 12x shorter time than the authors' loop against 2.0x
#: and 2.1x; on the VAE decoder likewise (12.7x against 2.1x), and on the class-conditional
#: DCGAN with its family's polish (14.0x against 2.6x, all 16 converged as with the polish alone).
#: Families not listed keep their default (docs/performance.md#held-out-generators has the
#: held-out half).
#:
#: GANs (and class-conditional GANs) first search each image from its guess alone
#: (``first_steps=50``: one start, 50 Adam steps, the polish), the full search only for the
#: images it leaves above their threshold: on
#: the tuning half's two DCGANs (100 own and 4 real images each, to the verdict;
#: bench/results/heldout_tuning_first50_n100.md) every own image converged either way, own images
#: 2.4x and 3.8x faster, real images 13% and 16% slower (they pay both searches), 5.5x and 6.7x
#: shorter time to the verdict than the authors' loop against 4.2x and 5.4x. On the VAE decoder it
#: made no difference to the mean (8.66x against 8.62x: own images 3x faster, real ones 16%
#: slower), so the vae default stays without it. The class-conditional GAN has it too (100 own
#: and 4 real images; bench/results/heldout_tuning_cond_first50_n100.md): own images 2.8x faster,
#: real ones 24% slower, 14.0x the authors' loop against 10.8x, the same 99 of 100 converged.
#: A StyleGAN started through its mapping network has a first search of its own (over ``w``):
#: there ``first_steps`` does not act (``WarmStarted.guess_searches``).
#:
#: The GAN warm default also lets a row levelled off far above its threshold go in the second
#: half of the Adam phase (``adam_settle_window=50``: over 30x the threshold, under 5% lower
#: than 50 steps before). Chosen on per-row trajectories of the tuning half's DCGANs
#: (bench/results/adam_settle_trajectories_cpu.md: no own row ending under 20x the line stopped,
#: 34% and 43% of the real images' Adam row-steps saved) and then to the verdict (100 own and 4
#: real images each; bench/results/heldout_tuning_asettle_n100.md): every own image converged
#: either way, real images 31% and 25% faster (750 Adam row-steps to 475 and 450), 6.65x and
#: 8.65x the authors' loop against 5.08x and 6.77x in the same runs.
#: The class-conditional warm default and the mapping start's search over ``z`` were not measured
#: with it (:func:`resolve_settings` leaves it off where the guess searches)
#:
#: An image the GAN warm default leaves above its threshold but within 4x of it has 4 more of its
#: Adam rows polished (``polish_escalate=4``: with 4 starts, every row), not the family default's
#: 2: on the tuning half's DCGANs (100 own and 32 real images each, Intel Xeon;
#: bench/results/heldout_tuning_encoder_cost_n100.md) it took dcgan64-photos' own image 30 from
#: 1.11x the line to 0.87x (100 of 100 converged against 99) and changed no other own or real
#: image's loss or row-steps; held out likewise no loss changed (no image in that band). The
#: class-conditional warm default polishes 8 more rows of such an image (of its 4 starts in each
#: class searched): on the tuning half's class-conditional GAN (100 own and 4 real images, Intel
#: Xeon; bench/results/heldout_tuning_cond_esc8_n100.md) 99 of 100 own images converged against 96
#: (images 31, 57 and 58 from 1.02x, 1.00x and 1.44x the line to under it; image 44, at 1.50x,
#: needs more Adam steps, not more polishes), no real image's loss changed, own images took 31%
#: longer and the mean came to 12.0x the authors' loop against 12.8x
WARM_DEFAULTS: dict[str, InversionSettings] = {
    "gan": FAMILY_DEFAULTS["gan"].replace(restarts=4, screen=8, steps=300, halving_every=50, first_steps=50,
                                          adam_settle_window=50, polish_escalate=4),
    "vae": FALLBACK_DEFAULT.replace(restarts=4, screen=8, steps=300, halving_every=50),
    "conditional": FAMILY_DEFAULTS["conditional"].replace(restarts=4, screen=8, steps=300, halving_every=50,
                                                          first_steps=50, polish_escalate=8),
}

#: where the warm start's guess is itself a search (the mapping start: its search over ``z``
#: follows the search over ``w``), the warm default with these fields, as that start was measured
#: and chosen: no settle rule in the Adam phase, the family default's escalation
SEARCHED_GUESS_FIELDS = {"adam_settle_window": 0, "polish_escalate": FAMILY_DEFAULTS["gan"].polish_escalate}


def resolve_settings(
    generator: GeneratorAdapter | None, settings: InversionSettings | str | None = None, **overrides
) -> InversionSettings:
    """The settings an inversion will use: a preset name, an object, or the family default, plus overrides.

    The family default is :data:`WARM_DEFAULTS`' where the generator's first starts are a learned
    guess (``guided_starts``) and its family has one there, with :data:`SEARCHED_GUESS_FIELDS`
    where that guess is itself a search (``guess_searches``: the mapping start, measured so)."""
    if settings is None or settings == "default":
        family = getattr(generator, "family", "gan")
        base = FAMILY_DEFAULTS.get(family, FALLBACK_DEFAULT)
        if getattr(generator, "guided_starts", False) and family in WARM_DEFAULTS:
            base = WARM_DEFAULTS[family]
            if getattr(generator, "guess_searches", False):
                base = base.replace(**SEARCHED_GUESS_FIELDS)
    elif isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f"settings must be one of {sorted(PRESETS) + ['default']} or InversionSettings, "
                             f"got {settings!r}")
        base = PRESETS[settings]
    elif isinstance(settings, InversionSettings):
        base = settings
    else:
        raise TypeError(f"settings must be a preset name or InversionSettings, got {type(settings).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**overrides) if overrides else base
