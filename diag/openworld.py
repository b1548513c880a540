"""Open world: a target owner's card, and ranking a folder of source vectors with no target images.

* :func:`build_target_card` — the portable Hessian card of a prediction-only model θ_ftᵀ given
  as an open_clip checkpoint plus local images: Hutchinson diagonal (with standard errors), trace,
  top-k eigenpairs; provenance names the model's sha256, the data's content hash and the settings.
* :func:`rank_folder` — rank the sources of a folder for that model. Tier 0 (the model alone):
  τ_ftᵀ = θ_target − θ_base gives cos(τ_ftˢ, τ_ftᵀ) globally and per block and the norms; tier 1
  (+ a card): R_card = Σ l_i (v_iᵀτ*)² + Σ r_j τ*_j² and R_diag = Σ diag(H)_j τ*_j², hence the
  quadratic loss increase ½λ²R and the largest λ2 of the grid within a loss budget.

A source is a sub-folder ``DIR/<name>/`` holding ``ft.safetensors`` (τ_ftˢ; needed for cos_ft)
and either ``star.safetensors`` (τ*ˢ) or ``ftx-a<α>.safetensors`` (τ_ft*ˢ; τ* = τ_ft* − τ_ft):
the layout of a store's ``vectors/`` folder, so a store exports by copying. Files are memory-mapped
(:class:`diag.features.mapped.TensorFile`) and read one parameter at a time, whose pages are dropped once used, never a
whole vector: memory stays at a few blocks whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from diag.constants import PAPER_LAMBDA2, PREDICTION_LEVEL
from diag.curvature.card import build_card, check_card_provenance
from diag.curvature.hutchinson import hutchinson_diagonal
from diag.curvature.kfac import build_kfac_card, card_file_form, CARD_FORMS
from diag.curvature.operators import HessianOperator
from diag.decide.predictor import fit_pair_predictor, rank_sources, tier_features
from diag.decide.record import MIN_TRAINING_PAIRS, training_pairs
from diag.decide.ranking import SourceRanking
from diag.curvature.risk import loss_model
from diag.decide.card_scale import calibrated_card_risk
from diag.decide.loss_model import calibrate, calibration_text, predicted_vs_measured
from diag.decide.rules import grid_floor, lambda2_from_predicted_drop, quadratic_lambda_max
from diag.features.kfac_scores import kfac_risks
from diag.features.mapped import _MemoryFile, CardStream, TensorFile
from diag.features.pair_features import CurvatureSettings
from diag.features.streamed import stream_features
from diag.table import load_study, table_files
from train.datasets.inputs import domain_for, split_inputs
from train.devices import resolve_device
from train.errors import ArtifactError, BaseMismatchError, DataError, unknown
from train.external_weights import (_is_safetensors, file_sha256, import_weights, MAX_RELATIVE_DISTANCE, read_state_dict,
                           visual_part)
from train.model import load_visual_state, SelfExplainingCLIP, text_head
from train.store import alpha_tag, base_state
from train.tensorio import dumps


def _checkpoint_rename(names) -> Callable[[str], str]:
    """Stored checkpoint names → ``visual.*``: strip ``module.``; a tower-only file gets the prefix."""
    stripped = [k.removeprefix("module.") for k in names]
    whole = any(k.startswith("visual.") for k in stripped)
    return lambda k: k.removeprefix("module.") if whole else "visual." + k.removeprefix("module.")


@dataclass
class Source:
    """One candidate: its τ_ft file (optional) and its τ* (``star``) or τ_ft* (``ftx``) file."""
    name: str
    ft: TensorFile | None
    star: TensorFile | None = None
    ftx: TensorFile | None = None
    quality: dict[str, float] = field(default_factory=dict)

    def files(self):
        return [f for f in (self.ft, self.star, self.ftx) if f is not None]


QUALITY_KEYS = ("ermse_star_source", "accuracy_ft_source")


def open_sources(folder: str | Path, alpha: float, base_hash: str, keys: dict[str, tuple]) -> tuple[list[Source], list[str]]:
    """The usable sources of ``folder`` and one note per sub-folder that could not be used (and why).

    A sub-folder is not used when it lacks the files of a τ*, or a file was taken from another base
    or has other parameters than ``keys`` (name → shape).

    Raises:
        DataError: ``folder`` is not a folder, or no sub-folder is usable.
        ArtifactError: a file is pickled, truncated or corrupt (never skipped silently).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--sources {folder} is not a folder")
    sources, notes = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = {"ft": sub / "ft.safetensors", "star": sub / "star.safetensors",
                 "ftx": sub / f"ftx-{alpha_tag(alpha)}.safetensors"}
        opened = {k: TensorFile(p) for k, p in files.items() if p.is_file()}
        why = _unusable(opened, base_hash, keys)
        if why:
            notes.append(f"source '{sub.name}' not used: {why}")
            for f in opened.values():
                f.close()
            continue
        quality = {}
        for f in opened.values():
            for q in QUALITY_KEYS:
                if q in f.metadata:
                    quality[q] = float(f.metadata[q])
        sources.append(Source(sub.name, opened.get("ft"), opened.get("star"), opened.get("ftx"), quality))
    if not sources:
        raise DataError(f"no usable source vectors in {folder} (expected <name>/ft.safetensors with star.safetensors or "
                        f"ftx-{alpha_tag(alpha)}.safetensors){': ' + '; '.join(notes) if notes else ''}")
    return sources, notes


def _unusable(opened: dict[str, TensorFile], base_hash: str, keys: dict[str, tuple]) -> str | None:
    if "star" not in opened and not ("ftx" in opened and "ft" in opened):
        return "no star.safetensors, nor ftx-a<α>.safetensors with ft.safetensors"
    for kind, f in opened.items():
        if f.metadata.get("base_hash") != base_hash:
            return f"{f.path.name} was taken from base {f.metadata.get('base_hash')}, not {base_hash}"
        shapes = {k: tuple(e["shape"]) for k, e in f.entries.items()}
        if shapes != keys:
            bad = sorted(set(shapes.items()) ^ set(keys.items()))[:1]
            return f"{f.path.name} does not match the backbone's parameters (e.g. {bad})"
    return None


def open_model(path: str | Path, keys: dict[str, tuple]):
    """The vision tower of a checkpoint, streamed when it is safetensors; names and shapes checked.

    Raises:
        BaseMismatchError: names or shapes differ from the store's backbone.
    """

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Target model not found: {path}")
    if _is_safetensors(path):
        f = TensorFile(path)
        ren = _checkpoint_rename(f.entries)
        f.entries = {ren(k): v for k, v in f.entries.items() if ren(k).startswith("visual.")}
    else:
        f = _MemoryFile(path, visual_part(read_state_dict(path)))
    shapes = {k: tuple(e["shape"]) for k, e in f.entries.items()}
    if shapes != keys:
        bad = sorted(set(shapes.items()) ^ set(keys.items()))[:2]
        raise BaseMismatchError(f"{path} does not match the store's backbone (e.g. {bad})")
    return f


@dataclass
class RankInputs:
    """What :func:`rank_folder` reads: the store's base, the target model, the sources, the card, the suite."""
    base: Path
    target_model: Path
    sources: Path
    card: Path | None = None
    study: Path | None = None


def _base_keys(base: TensorFile) -> dict[str, tuple]:
    return {k: tuple(e["shape"]) for k, e in base.entries.items() if k.startswith("visual.")}


def _check_card(card: CardStream, base_hash: str, model_sha: str, keys: dict) -> None:
    check_card_provenance(card.provenance, card.file.path, base_hash, model_sha)
    bad = [n for n in card.names if keys.get(n) != card.shapes[n]]
    if bad:
        raise BaseMismatchError(f"{card.file.path} covers '{bad[0]}' with a shape the backbone does not have")


def candidate_features(inputs: RankInputs, alpha: float) -> tuple[pd.DataFrame, list[str], dict]:
    """One row of features per usable source, notes on what was not used, and facts of the run.

    Returns:
        (features, notes, facts): the rows of :func:`diag.features.streamed.stream_features`; one note
        per sub-folder not used and per source without ``ft.safetensors``; ``target_model``,
        ``base_hash`` and, with a card, ``model_sha256``.

    Raises:
        BaseMismatchError: the model or card is not of the store's base, or ‖τ_ftᵀ‖/‖θ_base‖ exceeds
            :data:`train.external_weights.MAX_RELATIVE_DISTANCE`.
    """

    base = TensorFile(inputs.base)
    base_hash = base.metadata.get("base_hash", "")
    keys = _base_keys(base)
    target = open_model(inputs.target_model, keys)
    kfac = inputs.card is not None and card_file_form(inputs.card) == "kfac"
    card = CardStream(inputs.card) if inputs.card is not None and not kfac else None
    facts = {"target_model": str(inputs.target_model), "base_hash": base_hash}
    if inputs.card is not None:
        facts["model_sha256"] = file_sha256(inputs.target_model)
    if card is not None:
        _check_card(card, base_hash, facts["model_sha256"], keys)
    sources, notes = open_sources(inputs.sources, alpha, base_hash, keys)
    try:
        rows, nt, nb = stream_features(target, base, sources, card, list(keys))
        if kfac:  # a K-FAC card scores whole layers: τ* read per source (diag.features.kfac_scores)
            risks = kfac_risks(inputs.card, sources, base_hash, facts["model_sha256"])
            rows = [{**row, **risks[row["source"]]} for row in rows]
    finally:
        for f in [base, target, *([card.file] if card is not None else []), *(g for s in sources for g in s.files())]:
            f.close()
    if nb > 0 and nt / nb > MAX_RELATIVE_DISTANCE:
        raise BaseMismatchError(f"--target-model is {nt / nb:.0%} of ‖θ_base‖ away from the store's base {base_hash}: "
                                "it was not fine-tuned from it")
    for src in sources:
        if src.ft is None:
            notes.append(f"source '{src.name}' has no ft.safetensors: cos_ft and its blocks unknown for it")
    return pd.DataFrame(rows), notes, facts


def _suite_table(study: Path | None, target: str) -> pd.DataFrame | None:
    """Known pairs of the suite study at λ2 = 0.7 without ``target`` (None when there is no study table).

    Raises:
        ArtifactError: a study table that is damaged (never taken for no study).
    """

    if study is None or not Path(study).is_dir() or not table_files(Path(study)):
        return None
    return training_pairs(load_study(study, lambda2=PAPER_LAMBDA2), target)


def _loss_model_range(study: Path | None, target: str, notes: list[str]) -> float:
    """The largest λ2 at which the loss model held on the suite's known pairs (inf: no λ2 grid to tell).

    :func:`diag.decide.loss_model.calibrate` over the pairs without ``target`` of a ``--lambda-grid`` study.
    """
    if study is None or not Path(study).is_dir() or not table_files(Path(study)):
        return math.inf
    fit = predicted_vs_measured(training_pairs(load_study(study), target))
    if len(fit) == 0 or fit["lambda2"].nunique() < 2:
        notes.append("the suite study has no λ2 grid with measured val loss changes: where the loss model stops "
                     "holding is unknown (run `diag study --lambda-grid`)")
        return math.inf
    cal = calibrate(fit)
    notes.append(f"on the suite's known pairs: {calibration_text(cal)[-1]}")
    return math.inf if cal["fails_from"] is None else cal["valid_up_to"]


def _predict(cands: pd.DataFrame, train: pd.DataFrame, tier: int, model: str, budget: float, level: float,
             notes: list[str], valid_up_to: float = math.inf) -> tuple[pd.DataFrame, dict]:
    """Rank with the predictors fitted on the suite (and their summary); λ2 from the predicted drop (quadratic
    model), at most ``valid_up_to``."""
    wanted = tier_features(train, tier)
    features = [f for f in wanted if f in cands.columns and cands[f].notna().all()]
    lacking = [f for f in wanted if f not in features]
    if lacking:
        notes.append(f"suite features the candidates lack, not used: {', '.join(lacking)}")
    notes.append(f"predictor: {model} fitted on {len(train)} known pairs of the suite; features: {', '.join(features)}")
    predictor = fit_pair_predictor(train, features, model=model, level=level)
    out = rank_sources(cands, predictor)
    notes += predictor.notes()
    out["lambda2"] = [lambda2_from_predicted_drop(d, budget, valid_up_to=valid_up_to) for d in out["predicted_acc_drop"]]
    return out, predictor.summary()


def _proxy(cands: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """Rank by cos(τ_ftˢ, τ_ftᵀ), the paper's proxy, when there is no suite to fit a predictor on."""
    notes.append(f"no suite study with ≥ {MIN_TRAINING_PAIRS} known pairs in the store (run `diag study`): ranked by cos(τ_ft) alone, "
                 "the paper's proxy; no predicted E-RMSE or accuracy drop")
    key = cands["cos_ft"] if "cos_ft" in cands.columns else pd.Series(math.nan, index=cands.index)
    out = cands.assign(_k=key.fillna(-math.inf)).sort_values("_k", ascending=False, kind="stable")
    out = out.drop(columns="_k").reset_index(drop=True)
    out.insert(0, "rank", range(1, len(out) + 1))
    for col in ("predicted_ermse_norm", "predicted_acc_drop", "lambda2"):
        out[col] = math.nan
    return out


def rank_folder(inputs: RankInputs, target: str = "target", alpha: float = 0.8, max_acc_drop: float = 0.05,
                max_loss_increase: float = 0.05, model: str = "ridge", level: float = PREDICTION_LEVEL):
    """Rank the sources of ``inputs.sources`` for a target model known only by its weights (and card).

    Tier 0 without a card, tier 1 with one. With a suite study the predictors fitted on its
    known pairs give the predicted E-RMSE ÷ θ_ftᵀ's and accuracy drop, each with its interval
    over held-out targets, and λ2 from the predicted drop — never above the λ2 from which the
    loss model failed on the suite's pairs (:func:`_loss_model_range`);
    with a card, λ2 is also capped by the card's loss model: λ2·gᵀτ + ½ λ2² R_card ≤ ``max_loss_increase``
    (:func:`diag.decide.rules.quadratic_lambda_max`; ½ λ2² R_card alone for a card without g, and the
    notes say so), rounded down to the λ2 grid. Without a card (tier 0) there is no loss model at
    all, and the notes say that plainly. Without a study of at
    least :data:`diag.decide.record.MIN_TRAINING_PAIRS` known pairs the sources are ranked by
    cos(τ_ftˢ, τ_ftᵀ) alone, with no predictions and no λ2 from a drop.

    Args:
        inputs: the files to read (:class:`RankInputs`).
        target: the target's name in the ranking (and the domain left out of the suite's pairs).
        alpha: α of the sources' ``ftx-a<α>.safetensors`` files.
        max_acc_drop: budget on the predicted relative accuracy drop.
        max_loss_increase: budget on the card's predicted loss increase λ2·gᵀτ + ½ λ2² R_card, in nats.
        model: predictor model (:func:`diag.decide.predictor.fit_predictor`).
        level: level of the prediction intervals (:func:`diag.decide.predictor.fit_pair_predictor`).

    Returns:
        (ranking, facts): a :class:`diag.decide.ranking.SourceRanking` whose notes say what could not be
        used, and the run's facts (:func:`candidate_features`).
    """

    tier = 1 if inputs.card is not None else 0
    cands, notes, facts = candidate_features(inputs, alpha)
    train = _suite_table(inputs.study, target)
    predictions = {}
    if train is not None and len(train) >= MIN_TRAINING_PAIRS:
        out, predictions = _predict(cands, train, tier, model, max_acc_drop, level, notes,
                                    _loss_model_range(inputs.study, target, notes))
        n_train = len(train)
    else:
        out, n_train = _proxy(cands, notes), 0
    if tier == 1:
        g = [None if v is None or not math.isfinite(v) else float(v) for v in out["grad_dot_tau"]]
        risk = calibrated_card_risk(out, train, notes, card_file_form(inputs.card))
        out["loss_increase_card"] = [loss_model(PAPER_LAMBDA2, r, gt) for r, gt in zip(risk, g)]
        cap = [grid_floor(quadratic_lambda_max(max(r, 0.0), max_loss_increase, gt)) for r, gt in zip(risk, g)]
        out["lambda2"] = [c if math.isnan(p) else min(p, c) for p, c in zip(out["lambda2"], cap)]
        if all(gt is None for gt in g):
            notes.append(f"λ2 capped by the card: ½ λ2² R ≤ {max_loss_increase:g} nats of target loss (this card "
                         "stores no gradient: no first-order term gᵀτ; rebuild it with `diag card` to add one)")
        else:
            notes.append(f"λ2 capped by the card's loss model: λ2·gᵀτ + ½ λ2² R ≤ {max_loss_increase:g} nats of "
                         "target loss (g and H on the card's images)")
    else:
        notes.append("no loss model: without a --card (tier 0) there is no curvature and no gradient of the target "
                     "loss, so no predicted loss increase and no curvature cap on λ2")
    notes.append("not used (need target images): risk_exact, the measured accuracy grid; never used: cos_star "
                 "(needs target explanation labels)")
    out["measured_acc_drop"] = math.nan
    return SourceRanking(target, tier, max_acc_drop, out, n_train, notes, level=level, predictions=predictions), facts


def build_target_card(store, target: str, model_path: str | Path, data: str | Path | None,
                      settings: CurvatureSettings = CurvatureSettings(), progress: bool = False, *,
                      device: str | torch.device | None = None, lanczos_iters: int | None = None,
                      form: str | None = None):
    """The Hessian card of a prediction-only model θ_ftᵀ (an open_clip checkpoint) on local target images.

    H = ∇²_θ L_cls at θ_ftᵀ on the first ``n_images`` of ``split``; the head is the store's head of
    ``target`` when it has one, else CLIP's zero-shot head of the data's class names with θ_base's
    text tower. Hutchinson diagonal (``probes`` Rademacher probes: mean and standard error), trace
    ± stderr, top-k eigenpairs (Lanczos; ``lanczos_iters``: its Krylov dimension, None = its
    default), residual diag(H) − Σ l_i v_i², with ``form="eig"``. By default (``settings.card_form``, ``kfac``) the card is a
    :class:`~diag.curvature.kfac.KfacCard` instead (K-FAC factors of the GGN per linear layer, the
    Hutchinson diagonal on the parameters no layer covers; no eigenpairs). ``split``, ``n_images``, ``batch_size``, ``probes``,
    ``k`` (capped at the parameter count) and ``seed`` come from ``settings``; ``data`` is
    :func:`train.datasets.load_domain`'s; ``device`` runs the products.

    Returns:
        (card, estimate): the :class:`diag.curvature.card.HessianCard` (or ``KfacCard``) and the
        Hutchinson diagonal's estimate (``mean``, ``stderr``, ``total``, ``total_stderr``).
    """
    import copy

    form = settings.card_form if form is None else form
    if form not in CARD_FORMS:
        raise unknown("card form", form, CARD_FORMS)

    backbone, base_hash = store.load_base()
    base = base_state(backbone)
    theta = import_weights(model_path, base, base_hash, "ft").apply_to(base, base_hash=base_hash)
    domain = domain_for(backbone.config, target, data)
    if store.head_path(target).is_file():
        head, scale = store.load_head(target)
        head_from = "store head"
    else:
        head = text_head(backbone.clip, backbone.tokenizer, list(domain.classnames), list(domain.templates))
        scale, head_from = float(backbone.clip.logit_scale.detach().exp().clamp(max=100)), "zero-shot head"
    model = SelfExplainingCLIP(copy.deepcopy(backbone.clip.visual), head, scale)
    load_visual_state(model, theta)
    model.to(resolve_device(device)).eval()  # the products run on ``device``; the card is written from the CPU
    s = settings
    x, y = split_inputs(backbone.config, domain, s.split, s.n_images)
    batches = [(x[i:i + s.batch_size], y[i:i + s.batch_size]) for i in range(0, len(y), s.batch_size)]
    op = HessianOperator(model, batches)
    est = hutchinson_diagonal(op, num_matvecs=s.probes, seed=s.seed, progress=progress)
    prov = {"target": target, "base_hash": base_hash, "model_sha256": file_sha256(model_path),
            "model_file": Path(model_path).name, "data_hash": domain.data_key, "data_source": domain.source,
            "head": head_from, "settings": dumps({**asdict(s), "lanczos_iters": lanczos_iters}),
            "n_images_used": len(y), "point": "theta_ft of the target"}
    if form == "kfac":
        prov.update(trace=est.total, trace_stderr=est.total_stderr)
        return build_kfac_card(model, batches, hessian_diag=est.mean.double(), provenance=prov,
                               layer_scale="trace"), est
    card = build_card(op, min(s.k, op.shape[0]), hessian_diag=est.mean.double(), trace=est.total,
                      trace_stderr=est.total_stderr, provenance=prov, seed=s.seed,
                      **({} if lanczos_iters is None else {"num_iters": lanczos_iters}))
    return card, est


__all__ = ["CARD_FORMS", "TensorFile", "CardStream", "Source", "RankInputs", "open_sources", "open_model",
           "stream_features", "candidate_features", "rank_folder", "build_target_card"]
