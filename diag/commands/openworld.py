"""``diag import`` and ``diag card``: bringing your own weights, and a target owner's portable Hessian card."""

from __future__ import annotations

from pathlib import Path

import torch

from diag.commands.options import (add_alpha_option, add_common, add_curvature_options, add_probe_seed_option,
                                   add_train_seed_option, add_variant_option, context_from, curvature_settings,
                                   domain_name, K, writable_file)
from diag.commands.output import emit_json
from diag.features.mapped import skip_exit_collection
from diag.openworld import build_target_card, rank_folder, RankInputs
from diag.table import DEFAULT_STUDY
from train.backbones import read_checkpoint, state_hash
from train.errors import ArtifactError, BaseMismatchError, TvdiagError
from train.external_weights import file_sha256, import_weights, KINDS, read_state_dict, SUPPORTED, visual_part
from train.losses import check_alpha
from train.ownership import decide
from train.store import base_state


def register(sub) -> None:
    i = sub.add_parser("import", help="register externally trained weights (or an explainability vector) in the store",
                       description=f"Supported: {SUPPORTED}.")
    add_common(i)
    i.add_argument("--kind", required=True, choices=KINDS,
                   help="base: check θ_base; ft: θ_ft; ftx: θ_ft*; star: a bare explainability vector τ*")
    i.add_argument("--domain", type=domain_name, default=None, help="the domain the weights belong to (not for base)")
    i.add_argument("--input", required=True, type=Path, help="the checkpoint (.safetensors, or .pt/.bin state dict)")
    add_alpha_option(i, help="α of θ_ft* (ftx, star)")
    add_variant_option(i, help=None)
    add_train_seed_option(i, help="training seed folder")
    i.add_argument("--from-base", type=Path, default=None,
                   help="the base checkpoint the weights were fine-tuned from (checked against the store's by hash)")
    i.set_defaults(func=run_import)

    c = sub.add_parser("card", help="portable Hessian card of a target's prediction-only model (no data leaves)")
    add_common(c)
    c.add_argument("--target", required=True, type=domain_name)
    c.add_argument("--model", required=True, type=Path, help="θ_ftᵀ: an open_clip checkpoint fine-tuned from the base")
    c.add_argument("--out", required=True, type=writable_file, help="the card (.safetensors)")
    add_curvature_options(c, k_help="top eigenpairs")
    c.add_argument("--lanczos-iters", type=K, default=None,
                   help="Krylov dimension of the eigenpairs (default max(4k, 40); its basis holds that many "
                        "float64 copies of θ: fewer for a large model on a small machine, at some accuracy)")
    add_probe_seed_option(c)
    c.add_argument("--split", default="train", choices=("train", "val"))
    c.set_defaults(func=run_card)


def _base(store):
    if not store.base_path().is_file():
        raise ArtifactError(f"The store {store.folder} has no θ_base yet: import it first (`diag import --kind base "
                            "--input BASE --backbone NAME --checkpoint BASE`) or build it (`diag zoo`)")
    backbone, base_hash = store.load_base()
    return base_state(backbone), base_hash


def run_import(args) -> int:
    ctx = context_from(args)
    if args.kind == "base" and args.checkpoint is None and not ctx.store.base_path().is_file():
        args.checkpoint = str(args.input)  # a new base goes to the store later commands name with --checkpoint BASE
        ctx = context_from(args)
    store = ctx.store
    if args.kind == "base" and not store.base_path().is_file():
        out = _import_new_base(ctx, args)
    elif args.kind == "base":
        base, base_hash = _base(store)
        state = visual_part(read_state_dict(args.input))
        got = state_hash({k: v.float() for k, v in state.items()})
        if got != base_hash:
            raise BaseMismatchError(f"{args.input} is base {got}, the store already holds base {base_hash}; use "
                                    "another --store (or --backbone/--checkpoint) for another base")
        out = {"kind": "base", "path": str(store.base_path()), "written": False, "base_hash": base_hash,
               "sha256": file_sha256(args.input), "note": "already the store's base"}
    else:
        if args.domain is None:
            raise ArtifactError(f"--domain is required with --kind {args.kind}")
        base, base_hash = _base(store)
        vector = import_weights(args.input, base, base_hash, args.kind, args.from_base)
        store.check_writable()
        alpha = args.alpha if args.kind in ("ftx", "star") else None
        path, written = store.register_imported(vector, args.domain, args.kind, alpha, seed=args.train_seed,
                                                variant=args.variant)
        out = {"kind": args.kind, "domain": args.domain, "path": str(path), "written": written,
               "base_hash": base_hash, "sha256": vector.provenance["sha256"], "norm": vector.norm(),
               "n_params": vector.num_params}
    if args.json:
        emit_json(out)
    else:
        verb = "imported" if out["written"] else "already in the store"
        print(f"{out['kind']} {out.get('domain', '')} {verb}: {out['path']} (sha256 {out['sha256'][:16]}, "
              f"base {out['base_hash']})")
    return 0


def _import_new_base(ctx, args) -> dict:
    """θ_base into an empty store: the whole open_clip model of ``--input`` (text tower too: it builds the heads).

    The store is the one ``--backbone NAME --checkpoint INPUT`` names, and θ_base is written with
    the zoo's content key, so later commands given the same two options reuse it.
    """

    if Path(args.checkpoint).resolve() != Path(args.input).resolve() and (
            state_hash(read_checkpoint(args.checkpoint)) != state_hash(read_checkpoint(args.input))):
        raise BaseMismatchError(f"--input {args.input} and --checkpoint {args.checkpoint} are different weights; "
                                "θ_base is the --checkpoint of every later command: pass the same file")
    _, base_hash = ctx.zoo().base()
    return {"kind": "base", "path": str(ctx.store.base_path()), "written": True, "base_hash": base_hash,
            "sha256": file_sha256(args.input), "store": str(ctx.store.folder),
            "note": f"later commands: --backbone {ctx.zoo_config().backbone} --checkpoint {args.checkpoint}"}


def run_card(args) -> int:
    ctx = context_from(args, default_domain=args.target)
    settings = curvature_settings(args, seed=args.probe_seed, split=args.split)
    if args.lanczos_iters is not None and args.lanczos_iters < settings.k:
        raise TvdiagError(f"--lanczos-iters {args.lanczos_iters} is below --k {settings.k}: the Krylov space must "
                          "hold the k eigenvectors")
    decide(args.out, "", what="--out")  # before computing: a file tvdiag did not write is refused, a card replaced
    card, est = build_target_card(ctx.store, args.target, args.model, (ctx.data or {}).get(args.target), settings,
                                  progress=ctx.progress, device=ctx.device, lanczos_iters=args.lanczos_iters,
                                  form=settings.card_form)
    # tier 1's diagonal risk; bfloat16: a Hutchinson estimate, its per-entry noise far above bf16's 0.4 % rounding
    card.save(args.out, extra={"hessian_diag": est.mean.to(torch.bfloat16)})
    out = {"out": str(args.out), "form": settings.card_form, "dim": card.dim, "trace": est.total,
           "trace_stderr": est.total_stderr, "provenance": card.provenance, "megabytes": Path(args.out).stat().st_size / 1e6}
    if settings.card_form == "eig":
        out.update(k=card.k, eigvals=[float(v) for v in card.eigvals])
    else:
        out.update(layers=len(card.layers), uncovered=card.to_dict()["uncovered"])
    if args.json:
        emit_json(out, nan_as_null=True)
    else:
        print(f"Hessian card of '{args.target}' written to {args.out}: {card!r}")
        print(f"model sha256 {card.provenance['model_sha256'][:16]}, data {card.provenance['data_hash']}, "
              f"{card.provenance['n_images_used']} images")
    return 0


def run_rank_folder(args) -> int:
    """``diag rank-sources --target-model CKPT [--card CARD] --sources DIR``: no target images at all."""
    if args.target_model is None or args.sources is None:
        raise TvdiagError("open-world ranking needs both --target-model CKPT and --sources DIR (--card optional)")
    if args.tier != "auto":
        raise TvdiagError("--tier is not used with --target-model: tier 0 without --card, tier 1 with it")
    store = context_from(args).store
    check_alpha(args.alpha)
    if not store.base_path().is_file():
        raise ArtifactError(f"The store {store.folder} has no θ_base: the vectors' base must be in the store")

    study = args.study or store.study_dir(DEFAULT_STUDY)
    inputs = RankInputs(store.base_path(), args.target_model, args.sources, args.card, study)
    ranking, facts = rank_folder(inputs, target=args.target or "target", alpha=args.alpha,
                                 max_acc_drop=args.max_acc_drop, max_loss_increase=args.max_loss_increase,
                                 model=args.model or "ridge", level=args.level)
    skip_exit_collection()
    if args.json:
        out = ranking.to_dict()
        for s, (_, row) in zip(out["sources"], ranking.rows.iterrows()):
            s["loss_increase_card"] = row.get("loss_increase_card")
            s["grad_dot_tau"] = row.get("grad_dot_tau")
            s["norm_star_source"] = row.get("norm_star_source")
        has_g = any(v is not None and v == v for v in ranking.rows.get("grad_dot_tau", []))
        out["loss_model"] = (None if ranking.tier == 0 else "lambda2*g.tau + 0.5*lambda2^2*R_card" if has_g
                             else "0.5*lambda2^2*R_card (card without g)")
        emit_json({**out, **facts}, nan_as_null=True)
    else:
        print(ranking.table())
    return 0
