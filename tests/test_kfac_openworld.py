"""The K-FAC card form through the CLI: `diag card --card-form kfac`, then `rank-sources --card` scores with it."""

import json
import shutil

import pytest
from safetensors.torch import save_file

from tests._smoke import BACKBONE_ID, one_thread, smoke_store
from tests.test_openworld import _cli, _finetuned, _image_folder


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_kfac_card_from_the_cli_ranks_sources(tmp_path):
    src = smoke_store()
    root = tmp_path / "store"
    shutil.copytree(src.folder, root / BACKBONE_ID, ignore=shutil.ignore_patterns("studies", "curvature"))
    backbone, _ = src.load_base()
    whole = {k: v.detach().clone() for k, v in backbone.clip.state_dict().items()}
    store = ["--store", str(root), "--preset", "smoke", "--quiet"]
    save_file(_finetuned(whole, 5), tmp_path / "target.safetensors")
    data = _image_folder(tmp_path / "pets")
    card = tmp_path / "card.safetensors"
    code, out = _cli("card", "--target", "pets", "--model", str(tmp_path / "target.safetensors"), "--data",
                     f"pets={data}", "--out", str(card), "--n-images", "8", "--probes", "4", "--card-form", "kfac",
                     "--json", *store)
    assert code == 0, out
    rec = json.loads(out)
    assert rec["form"] == "kfac" and rec["layers"] > 0 and rec["uncovered"] > 0
    from diag.curvature.kfac import KfacCard, load_any_card

    loaded = load_any_card(card)
    assert isinstance(loaded, KfacCard) and loaded.gradient is not None
    code, out = _cli("rank-sources", "--target", "pets", "--target-model", str(tmp_path / "target.safetensors"),
                     "--card", str(card), "--sources", str(root / BACKBONE_ID / "vectors"), "--json", *store)
    assert code == 0, out
    ranking = json.loads(out)
    assert ranking["tier"] == 1
    from train.store import Store

    tau = Store(root, BACKBONE_ID).explainability_vector("mnist", 0.8).tensors
    mnist = next(s for s in ranking["sources"] if s["source"] == "mnist")
    assert mnist["risk_card"] == pytest.approx(loaded.risk(tau), rel=1e-6)
    assert mnist["risk_card"] > 0 and mnist["risk_diag"] > 0


def test_diagnostics_score_with_the_kfac_form_when_asked(tmp_path):
    """`Diagnostics` (default form kfac) puts the trace-scaled K-FAC card's risk and gᵀτ in risk_card /
    grad_dot_tau without building the eig card; the eig form's columns are the eig card's; both share the
    diagonal; an unknown form names the choices."""
    from diag.curvature.kfac import KfacCard
    from diag.features.pair_features import CurvatureSettings, Diagnostics
    from train.errors import UnknownNameError
    from train.store import Store

    src = smoke_store()
    shutil.copytree(src.folder, tmp_path / BACKBONE_ID, ignore=shutil.ignore_patterns("studies", "curvature"))
    store = Store(tmp_path, BACKBONE_ID)
    settings = CurvatureSettings(n_images=16, batch_size=8, probes=4, k=2)
    with pytest.raises(UnknownNameError, match="kfac"):
        Diagnostics(store, settings=settings, card_form="kron")
    eig = Diagnostics(store, settings=settings, sources=["mnist"], card_form="eig")
    kfac = Diagnostics(store, settings=settings, sources=["mnist"])
    assert kfac.card_form == "kfac" and eig.card_form == "eig"
    r_kfac = kfac.risks("mnist", "gtsrb", exact=False)
    assert not eig.card_path("gtsrb").exists() and kfac.curvature("gtsrb").eig is None  # no Lanczos run
    r_eig = eig.risks("mnist", "gtsrb", exact=False)
    card = kfac.curvature("gtsrb").card
    assert isinstance(card, KfacCard) and card.provenance["key"] == kfac._curvature_key("gtsrb")
    assert card.layer_scales is not None and card.gradient is not None
    tau = kfac.vector("mnist", "star").tensors
    assert r_kfac["risk_card"] == pytest.approx(card.risk(tau), rel=1e-12) and r_kfac["risk_card"] > 0
    assert r_eig["risk_card"] == pytest.approx(eig.curvature("gtsrb").card.risk(tau), rel=1e-12)
    assert r_kfac["risk_diag"] == r_eig["risk_diag"]
    # cached in the store: a second Diagnostics reads the same card
    again = Diagnostics(store, settings=settings, sources=["mnist"])
    assert again.risks("mnist", "gtsrb", exact=False)["risk_card"] == r_kfac["risk_card"]
