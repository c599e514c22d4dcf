"""Quality signals: zero-cost proxies against hand-computed values, determinism, short
training on the built-in digits, user data (npz, ImageFolder) and data configuration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from blocks.spec import ArchSpec
from search.evaluators.datasets import DataError, load_dataset
from search.evaluators.proxies import ProxyError, grad_norm, meco, naswot, synflow, zico
from search.evaluators.quality import QualityError, adapt_spec, evaluate_quality
from search.evaluators.types import QualitySettings

TINY = ArchSpec.model_validate({
    "name": "tiny", "resolution": 32, "num_classes": 10,
    "stem": {"out_channels": 16, "stride": 2, "act": "relu6"},
    "stages": [
        {"block": {"kind": "mbconv", "out_channels": 16, "expand": 2, "stride": 2,
                   "act": "relu6"}},
        {"block": {"kind": "mbconv", "out_channels": 32, "expand": 3, "stride": 2,
                   "act": "hswish"}, "repeats": 2},
    ],
    "head": {"out_channels": 64, "kernel": 1},
})


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def q(signal: str, **kw) -> QualitySettings:
    return QualitySettings(signal=signal, **kw)


# ---- proxies against hand-computed values ---------------------------------------------------


class _TwoLayer(nn.Module):
    def __init__(self, w1, w2, act=nn.ReLU):
        super().__init__()
        self.fc1 = nn.Linear(2, 3, bias=False)
        self.act1 = act()
        self.fc2 = nn.Linear(3, 2, bias=False)
        self.act2 = act()
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor(w1, dtype=torch.float32))
            self.fc2.weight.copy_(torch.tensor(w2, dtype=torch.float32))

    def forward(self, x):
        return self.act2(self.fc2(self.act1(self.fc1(x))))


def test_naswot_equals_hand_computed_slogdet():
    # Layer 1 is the identity on the first two units plus their sum, so the codes of the
    # three inputs are known by inspection; layer 2 gives two more units.
    w1 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    w2 = [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
    x = torch.tensor([[1.0, -2.0], [-2.0, 1.0], [1.0, 1.0]])
    # layer-1 pre-activations: [1,-2,-1], [-2,1,-1], [1,1,2] -> codes 100, 010, 111
    # layer-2 pre-activations (on the ReLU outputs [1,0,0], [0,1,0], [1,1,2]):
    #   [1, 0], [0, -1], [1, -1] -> codes 10, 00, 10
    codes = np.array([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=float)
    k = codes @ codes.T + (1 - codes) @ (1 - codes).T
    assert k.tolist() == [[5, 2, 3], [2, 5, 2], [3, 2, 5]]
    expected = math.log(64.0)  # 5*(25-4) - 2*(10-6) + 3*(4-15)
    assert np.linalg.det(k) == pytest.approx(64.0)
    value, details = naswot(_TwoLayer(w1, w2), x)
    assert value == pytest.approx(expected, abs=1e-12)
    assert details["units"] == 5 and details["activations"] == 2


def test_naswot_codes_hswish_units_by_pre_activation_sign():
    w1 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w2 = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    x = np.array([[1.0, -2.0], [-2.0, 1.0], [1.0, 1.0]])

    def hswish(v):
        return v * np.clip(v + 3.0, 0.0, 6.0) / 6.0

    h1 = x @ w1.T
    h2 = hswish(h1) @ w2.T  # negative hswish outputs reach layer 2 (ReLU's would be 0)
    codes = np.concatenate([h1 > 0, h2 > 0], axis=1).astype(float)
    k = codes @ codes.T + (1 - codes) @ (1 - codes).T
    value, _ = naswot(_TwoLayer(w1.tolist(), w2.tolist(), nn.Hardswish), torch.tensor(
        x, dtype=torch.float32))
    assert value == pytest.approx(math.log(np.linalg.det(k)), abs=1e-12)
    relu, _ = naswot(_TwoLayer(w1.tolist(), w2.tolist(), nn.ReLU), torch.tensor(
        x, dtype=torch.float32))
    assert value != relu  # the second layer's codes differ between the two


def test_naswot_singular_kernel_is_an_error():
    net = _TwoLayer([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, 0, 0], [0, 1.0, 0]])
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]])  # identical inputs, identical codes
    with pytest.raises(ProxyError, match="singular"):
        naswot(net, x)


def test_synflow_equals_hand_computed_value():
    # All-ones input, |weights|: R = 1^T |W2| |W1| 1 and, by homogeneity, each layer's
    # sum |theta * dR/dtheta| equals R, so the score is 2R.
    w1 = [[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]]
    w2 = [[2.0, 1.0, -1.0], [0.0, -4.0, 1.0]]
    a1 = np.abs(np.array(w1)) @ np.ones(2)
    r = float(np.ones(2) @ (np.abs(np.array(w2)) @ a1))
    assert r == pytest.approx(16.5)
    value, details = synflow(_TwoLayer(w1, w2), (2,))
    assert value == pytest.approx(math.log(2 * r), abs=1e-12)
    assert details["log_R"] == pytest.approx(math.log(r), abs=1e-12)


def test_synflow_removes_batchnorm_and_survives_relu6():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                         nn.BatchNorm2d(8), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))
    with torch.no_grad():  # BN statistics that would change the result if BN were kept
        conv[1].running_var.fill_(1e-4)
        conv[4].weight.fill_(10.0)
    plain = nn.Sequential(conv[0], nn.ReLU(), conv[3], nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), conv[8])
    a, da = synflow(conv, (3, 16, 16))
    b, _ = synflow(plain, (3, 16, 16))
    assert a == pytest.approx(b, rel=1e-12)
    assert da["norms_removed"] == 2
    # the caller's model is untouched
    assert float(conv[4].weight.detach()[0]) == 10.0 and float(conv[0].weight.detach().min()) < 0


def test_grad_norm_matches_manual_gradients():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    value, _ = grad_norm(net, x, y)
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    expected = float(net[1].weight.grad.norm() + net[3].weight.grad.norm())
    assert value == pytest.approx(expected, rel=1e-6)


# ---- evaluate_quality: determinism and seeds ------------------------------------------------


@pytest.mark.parametrize("signal", ["synflow", "naswot", "grad_norm"])
def test_proxies_are_deterministic_and_depend_on_the_seed(signal):
    a = evaluate_quality(TINY, q(signal, seed=3))
    b = evaluate_quality(TINY, q(signal, seed=3))
    c = evaluate_quality(TINY, q(signal, seed=4))
    assert a.value == b.value
    assert math.isfinite(a.value)
    assert a.value != c.value  # the initialization (and minibatch) follow the seed
    assert a.signal == signal and a.details["seed"] == 3
    assert a.details["num_classes"] == 10 and a.details["resolution"] == 32


def test_proxy_ranks_a_wider_network_above_a_narrower_one():
    wide = TINY.model_validate({**TINY.model_dump(), "stem": {"out_channels": 32,
                                                              "stride": 2}})
    for signal in ("synflow", "naswot"):
        assert (evaluate_quality(wide, q(signal)).value
                > evaluate_quality(TINY, q(signal)).value), signal


def test_training_on_digits_beats_chance_and_is_reproducible():
    settings = q("train", steps=80, batch=32, seed=0)
    a = evaluate_quality(TINY, settings)
    assert a.details["chance_accuracy"] < 0.12
    assert a.value > 0.6, a.details  # chance is 0.10
    assert a.details["n_val"] == 359 and a.details["steps"] == 80
    b = evaluate_quality(TINY, settings)
    assert b.value == a.value and b.details["val_loss"] == a.details["val_loss"]


def test_thread_count_is_fixed_by_the_settings():
    # float32 gradient sums depend on the thread count; the settings pin it (default 1)
    pinned = evaluate_quality(TINY, q("grad_norm"))
    torch.set_num_threads(2)
    again = evaluate_quality(TINY, q("grad_norm"))
    assert torch.get_num_threads() == 2  # the caller's setting is restored
    assert again.value == pinned.value and again.details["threads"] == 1
    free = evaluate_quality(TINY, q("grad_norm", threads=None))
    assert free.details["threads"] == 2
    assert free.value == pytest.approx(pinned.value, rel=1e-5)


def test_signal_none_and_tiny_batches_are_clear_errors():
    with pytest.raises(QualityError, match="none"):
        evaluate_quality(TINY, q("none"))
    with pytest.raises(ProxyError, match="at least 2"):
        evaluate_quality(TINY, q("naswot", batch=1))
    with pytest.raises(QualityError, match="batch >= 2"):
        evaluate_quality(TINY, q("train", batch=1, steps=1))


def test_spec_is_adapted_to_the_data():
    spec = TINY.model_validate({**TINY.model_dump(), "num_classes": 1000, "resolution": 224})
    r = evaluate_quality(spec, q("synflow", resolution=40))
    assert r.details["num_classes"] == 10
    assert r.details["resolution"] == 40
    assert r.details["in_channels"] == 3 and r.details["data_channels"] == 1
    adapted = adapt_spec(spec, load_dataset("digits", 40), 40)
    assert r.details["spec_hash"] == adapted.hash
    assert (adapted.num_classes, adapted.resolution, adapted.in_channels) == (10, 40, 3)
    from blocks.cost import estimate_cost

    assert r.details["params"] == estimate_cost(adapted).params


# ---- data sets ------------------------------------------------------------------------------


def test_digits_resized_standardized_and_split():
    ds = load_dataset("digits", 24)
    assert ds.x_train.shape[1:] == (1, 24, 24) and ds.x_val.shape[1:] == (1, 24, 24)
    assert ds.x_train.shape[0] + ds.x_val.shape[0] == 1797
    assert ds.num_classes == 10
    assert abs(float(ds.x_train.mean())) < 1e-4 and float(ds.x_train.std()) == pytest.approx(
        1.0, abs=1e-3)
    # stratified: every class is in the validation split in proportion
    counts = torch.bincount(ds.y_val, minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 38
    # the split is fixed, the same on every load
    again = load_dataset("digits", 32)
    assert torch.equal(torch.bincount(again.y_val), counts)


def _npz_images(n_per_class: int, classes=(3, 7, 9), size=10, channels_last=True, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i, label in enumerate(classes):
        base = np.zeros((size, size, 3), dtype=np.uint8)
        base[:, :, i % 3] = 200  # class = dominant colour channel
        for _ in range(n_per_class):
            xs.append(np.clip(base + rng.integers(0, 50, base.shape), 0, 255).astype(np.uint8))
            ys.append(label)
    x = np.stack(xs)
    if not channels_last:
        x = x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return x, np.array(ys)


def test_npz_source_nhwc_uint8_trains_and_adapts_channels(tmp_path):
    x, y = _npz_images(30)
    path = tmp_path / "colours.npz"
    np.savez(path, x=x, y=y)
    spec = TINY.model_validate({**TINY.model_dump(), "in_channels": 1})
    sources = {"colours": str(path)}
    r = evaluate_quality(spec, q("train", data="colours", steps=30, batch=16), sources)
    assert r.details["num_classes"] == 3 and r.details["in_channels"] == 3
    assert r.details["source"] == str(path)
    assert r.value > 0.8  # trivially separable by colour
    ds = load_dataset("colours", 16, sources)
    assert ds.classes == ("3", "7", "9") and sorted(torch.unique(ds.y_train).tolist()) == [0, 1, 2]


def test_npz_source_nchw_with_fixed_validation_split(tmp_path):
    x, y = _npz_images(10, channels_last=False)
    xv, yv = _npz_images(4, channels_last=False, seed=1)
    path = tmp_path / "nchw.npz"
    np.savez(path, x=x, y=y, x_val=xv, y_val=yv)
    ds = load_dataset("nchw", 16, {"nchw": str(path)})
    assert ds.x_train.shape == (30, 3, 16, 16) and ds.x_val.shape == (12, 3, 16, 16)
    r = evaluate_quality(TINY, q("naswot", data="nchw", batch=8), {"nchw": str(path)})
    assert math.isfinite(r.value) and r.details["n_val"] == 12


def test_bad_npz_files_are_clear_errors(tmp_path):
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 8, 8)))
    np.savez(tmp_path / "odd.npz", x=np.zeros((4, 100, 8, 100)), y=np.arange(4))
    np.savez(tmp_path / "one.npz", x=np.zeros((4, 8, 8)), y=np.zeros(4))
    (tmp_path / "junk.npz").write_text("not a zip")
    cases = {"noy": "missing array", "odd": "cannot tell channels", "one": "at least 2",
             "junk": "not a readable"}
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_dataset(name, 16, {name: str(tmp_path / f"{name}.npz")})
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("gone", 16, {"gone": str(tmp_path / "gone.npz")})


def test_image_folder_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, cname in enumerate(["cat", "ant", "bee"]):  # classes sort: ant, bee, cat
        d = tmp_path / "imgs" / cname
        d.mkdir(parents=True)
        for k in range(6):
            a = np.full((12 + k, 9 + k, 3), 40, dtype=np.uint8)  # sizes differ on purpose
            a[:, :, ci] = 220
            a = np.clip(a + rng.integers(0, 30, a.shape), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{k}.png")
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("ignored")
    sources = {"bugs": str(tmp_path / "imgs")}
    ds = load_dataset("bugs", 16, sources)
    assert ds.classes == ("ant", "bee", "cat")
    assert ds.in_channels == 3 and ds.num_classes == 3
    assert ds.x_train.shape[0] + ds.x_val.shape[0] == 18
    r = evaluate_quality(TINY, q("grad_norm", data="bugs", batch=8, resolution=16), sources)
    assert r.details["num_classes"] == 3 and r.value > 0


def test_grayscale_image_folder_stays_single_channel(tmp_path):
    from PIL import Image

    for cname in ("a", "b"):
        (tmp_path / cname).mkdir()
        for k in range(3):
            Image.fromarray(np.full((8, 8), 30 * k + (100 if cname == "b" else 0),
                                    dtype=np.uint8), mode="L").save(tmp_path / cname / f"{k}.png")
    ds = load_dataset("gray", 8, {"gray": str(tmp_path)})
    assert ds.in_channels == 1 and ds.num_classes == 2


def test_unknown_data_name_is_a_clear_error():
    with pytest.raises(DataError) as err:
        evaluate_quality(TINY, q("synflow", data="imagenet"), {"flowers": "/nowhere"})
    text = str(err.value)
    assert "unknown data set 'imagenet'" in text and "digits" in text and "flowers" in text
    assert "\n" not in text


# ---- ZiCo and MeCo against hand-computed values ---------------------------------------------


def test_zico_equals_hand_computed_value():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])),
               (torch.randn(5, 3), torch.tensor([1, 1, 0, 0, 1]))]
    value, extra = zico(net, batches)
    expected = 0.0
    grads = []
    for x, y in batches:
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        grads.append([net[0].weight.grad.clone().double(), net[2].weight.grad.clone().double()])
    for layer in range(2):
        g = torch.stack([grads[b][layer] for b in range(2)])
        mean_abs, std = g.abs().mean(0), g.std(0, unbiased=False)
        keep = std > 0
        expected += math.log(float((mean_abs[keep] / std[keep]).sum()))
    assert value == pytest.approx(expected, rel=1e-9)
    assert extra == {"layers": 2, "batches": 2}
    with pytest.raises(ProxyError, match="two minibatches"):
        zico(net, batches[:1])


def test_meco_equals_hand_computed_least_eigenvalue():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(3, 2, 1, bias=False))
    x = torch.randn(4, 1, 5, 5)
    value, extra = meco(net, x)
    with torch.no_grad():
        f1 = net[0](x[:1])[0].double().reshape(3, -1)
        f2 = net[2](net[1](net[0](x[:1])))[0].double().reshape(2, -1)
    expected = sum(float(np.linalg.eigvalsh(np.corrcoef(f.numpy())).min()) for f in (f1, f2))
    assert value == pytest.approx(expected, rel=1e-9) and extra["layers"] == 2
    # two channels: eigenvalues of [[1, r], [r, 1]] are 1 +- |r|
    r = float(np.corrcoef(f2.numpy())[0, 1])
    assert float(np.linalg.eigvalsh(np.corrcoef(f2.numpy())).min()) == pytest.approx(1 - abs(r))


@pytest.mark.parametrize("signal", ["zico", "meco"])
def test_new_proxies_are_deterministic_and_finite(signal):
    a = evaluate_quality(TINY, q(signal, seed=3))
    b = evaluate_quality(TINY, q(signal, seed=3))
    assert a.value == b.value and math.isfinite(a.value)
    assert a.value != evaluate_quality(TINY, q(signal, seed=4)).value


def test_params_and_macs_signals_are_the_adapted_specs_counts():
    p = evaluate_quality(TINY, q("params"))
    m = evaluate_quality(TINY, q("macs"))
    assert p.value == p.details["params"] > 1000 and m.value == m.details["macs"]
    wide = TINY.model_validate({**TINY.model_dump(), "stem": {"out_channels": 32,
                                                              "stride": 2}})
    assert evaluate_quality(wide, q("params")).value > p.value


# ---- multi-fidelity training -----------------------------------------------------------------


def test_rung_schedule_defaults_and_validation():
    assert QualitySettings().rung_steps() == [100, 200]
    assert QualitySettings(steps=120, rungs=[30, 60]).rung_steps() == [30, 60, 120]
    assert QualitySettings(steps=120, rungs=[30, 60, 120]).rung_steps() == [30, 60, 120]
    assert QualitySettings(steps=1).rung_steps() == [1]
    for bad in ([60, 30], [0, 5], [30, 300]):
        with pytest.raises(ValueError, match="rungs"):
            QualitySettings(steps=120, rungs=bad)


def test_rungs_report_every_fidelity_and_a_pruned_run_keeps_its_rung_value():
    settings = q("train", steps=24, rungs=[6, 12], batch=16, seed=0)
    seen: list[tuple[int, float]] = []
    full = evaluate_quality(TINY, settings, on_rung=lambda s, v: seen.append((s, v)) or True)
    assert [r[0] for r in full.details["rungs"]] == [6, 12, 24]
    assert [s for s, _ in seen] == [6, 12]  # the last rung is the result, not a report
    assert not full.pruned and full.value == full.details["rungs"][-1][1]
    assert full.details["steps"] == 24 and len(full.details["rung_seconds"]) == 3
    stopped = evaluate_quality(TINY, settings, on_rung=lambda s, v: s < 12)
    assert stopped.pruned and stopped.details["steps"] == 12
    # the schedule is the full run's: the pruned run's value is the full run's at step 12
    assert stopped.value == full.details["rungs"][1][1]
    assert stopped.details["rungs"] == full.details["rungs"][:2]


# ---- shapes32 --------------------------------------------------------------------------------


def test_shapes32_is_built_in_balanced_and_the_same_bytes_every_time():
    from search.evaluators.shapes import CLASSES, generate

    x, y = generate(n_per_class=20)
    x2, _ = generate(n_per_class=20)
    assert x.shape == (200, 3, 32, 32) and x.dtype == np.float32
    assert np.array_equal(x, x2) and x.min() >= 0.0 and x.max() <= 1.0
    assert np.bincount(y).tolist() == [20] * len(CLASSES) == [20] * 10
    ds = load_dataset("shapes32")
    assert ds.num_classes == 10 and ds.in_channels == 3 and ds.resolution == 32
    assert ds.x_train.shape[0] == 4000 and ds.x_val.shape[0] == 1000
    assert ds.classes[:3] == ("disk", "ring", "square") and ds.source.startswith("built-in")
    assert abs(float(ds.x_train.mean())) < 1e-3  # standardized like every data set


def test_shapes32_classes_differ_in_outline_not_in_colour():
    from search.evaluators.shapes import generate

    x, y = generate(n_per_class=200)
    colour = x.mean(axis=(2, 3))  # N,3: the mean colour of each image
    hue = colour - colour.mean(axis=1, keepdims=True)  # its chromatic part
    per_class = np.stack([hue[y == k].mean(0) for k in range(10)])
    # the hue of a class says nothing about it (its brightness tells its area, as in
    # photos): class means differ by no more than sampling noise (6 standard errors)
    standard_error = hue.std(axis=0) / np.sqrt(200)
    assert (np.ptp(per_class, axis=0) < 6 * standard_error).all()
    # but the shapes differ: a disk covers more of its centre than a ring
    centre = x[:, :, 13:19, 13:19].mean(axis=(1, 2, 3)) - x.mean(axis=(1, 2, 3))
    assert centre[y == 0].mean() > centre[y == 1].mean() + 0.05


@pytest.mark.slow
def test_shapes32_separates_architectures_as_recorded():
    """The best and the worst network of the recorded compact32 table, trained again by
    the table's recipe: they land where the table says, far apart (receptive field, depth
    and width: kernel 5 and two MBConv repeats of width 80 against one depthwise-separable
    block of width 40)."""
    from blocks.load import load_spec

    best = load_spec("net_v1_r32_nc10_n-compact32-candidate,stem:cn_s2_c16,ds_c16,"
                     "ir_r2_k5_s2_e3.0_c40,ir_r2_s2_e3.0_c80,head:cn_k1_c128,fc_drop0.1")
    worst = load_spec("net_v1_r32_nc10_n-compact32-candidate,stem:cn_s2_c16,ds_c16,"
                      "ir_s2_e3.0_c32,ds_s2_c40,head:cn_k1_c96,fc_drop0.1")
    settings = q("train", data="shapes32", steps=120, rungs=[30, 60], batch=32, seed=0)
    a = evaluate_quality(best, settings).value
    b = evaluate_quality(worst, settings).value
    assert a == pytest.approx(0.473, abs=0.03) and b == pytest.approx(0.183, abs=0.03)
    assert a - b > 0.2
