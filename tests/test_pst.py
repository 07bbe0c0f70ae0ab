"""PST: per-layer top-k masks at the scheduled sparsity, the cubic schedule, the straight-through gradients, exact
retained parameters, resume state, bad input, and the plain-transformers export reproducing the run."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import fast_overrides, make_cfg
from sparse_peft import UserError
from sparse_peft.config import load_run_config
from sparse_peft.export import export
from sparse_peft.methods import build_method
from sparse_peft.methods.pst import Level, PstConfig, PstLinear, kth_smallest, pst_modules, topk_mask
from sparse_peft.models import build_model, load_tokenizer
from sparse_peft.schedulers import plan
from sparse_peft.tasks import build_task
from sparse_peft.train import train

H, FFN, LAYERS = 32, 64, 2  # configs/model/tiny_bert.yaml
HEAD = (H * H + H) + (2 * H + 2)  # pooler + classifier


def build(method="pst", *extra):
    run = load_run_config(make_cfg([f"method={method}", "model=tiny_bert", "logger.wandb.mode=disabled", *extra]))
    torch.manual_seed(0)
    model = build_model(run.model, build_task(run.task, run.data), load_tokenizer(run.model))
    method_ = build_method(run.method, run.model)
    return run, method_, method_.inject(model)


def randomize(model, seed=1):
    """Non-zero V, B, R, C (they start at zero) so that every term of W' and of the score matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in pst_modules(model):
            for p in (m.pst_V, m.pst_B, m.pst_R, m.pst_C):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def batch(n=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1] * (n // 2))}


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_mask_density_per_layer_is_the_scheduled_sparsity(sparsity):
    _, method, model = build()
    randomize(model)
    method.set_threshold(sparsity)
    layers = pst_modules(model)
    assert len(layers) == 6 * LAYERS
    for name, m in layers:
        n = m.weight.numel()
        mask = m.mask()
        zeros = 0 if mask is None else int((~mask).sum())
        assert zeros == int(n * sparsity), name
        assert method.measured_sparsity(model)[name] == pytest.approx(int(n * sparsity) / n)


def test_magnitude_overlap_says_whether_the_learned_score_decided_anything():
    _, method, model = build()
    method.set_threshold(0.0)
    assert method.log_values(model)["magnitude_overlap"] is None  # nothing pruned
    method.set_threshold(0.5)
    assert method.log_values(model)["magnitude_overlap"] == 1.0  # B, R, C start at zero: the score is |W'|
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in pst_modules(model):  # a learned score that dwarfs |W'|: the pruned set is mostly its choice
            m.pst_R.copy_(torch.randn(m.pst_R.shape, generator=g))
    assert 0.3 < method.log_values(model)["magnitude_overlap"] < 0.9


def test_topk_mask_prunes_the_lowest_scores_even_with_ties():
    s = torch.tensor([[0.5, 0.0, 0.0], [0.0, 2.0, 0.1]])
    mask = topk_mask(s, 0.5)  # 3 of 6 zeroed: the lowest scores, ties at 0 broken exactly
    assert int((~mask).sum()) == 3 and mask[0, 0] and mask[1, 1] and mask[1, 2]
    assert topk_mask(s, 0.1) is None  # int(6 * 0.1) == 0: nothing pruned
    tied = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 3.0])
    assert topk_mask(tied, 2 / 7).tolist() == [True, False, False, True, True, True, True]  # the first ties go
    g = torch.Generator().manual_seed(0)
    many = torch.randint(0, 7, (40, 30), generator=g).float()  # ties at every threshold
    for sparsity in (0.1, 0.5, 0.9, 0.99):
        mask, k = topk_mask(many, sparsity), int(many.numel() * sparsity)
        assert int((~mask).sum()) == k and many[~mask].max() <= many[mask].min()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the training step's 0/1 form, counted exactly
            assert torch.equal(topk_mask(many.to(dtype), sparsity, dtype), mask.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_kth_smallest_is_torch_kthvalue(dtype):
    g = torch.Generator().manual_seed(0)
    for flat in (torch.randn(1537, generator=g), torch.randint(0, 5, (300,), generator=g).float()):  # ties too
        flat = flat.to(dtype)
        for k in (1, 2, len(flat) // 2, len(flat) - 1, len(flat)):
            got = kth_smallest(flat, k)
            assert got.dtype == dtype and got.dim() == 0 and torch.equal(got, flat.kthvalue(k).values)


def test_cubic_schedule_is_its_formula():
    run = load_run_config(make_cfg(["method=pst", "scheduler=cubic", "model=tiny_bert", "method.sparsity=0.8",
                                    "trainer.max_steps=1000", "logger.wandb.mode=disabled"]))
    p = plan(run, n_train=100)
    T = p.total_steps
    assert T == 1000

    def formula(t):  # s_f + (s_i - s_f)(1 - (t - 0.1T)/(0.6T))^3 with s_i = 0, s_f = 0.8
        if t < 0.1 * T:
            return 0.0
        if t >= 0.7 * T:
            return 0.8
        return 0.8 + (0.0 - 0.8) * (1 - (t - 0.1 * T) / (0.6 * T)) ** 3

    for t in (0, 50, 99, 100, 101, 250, 400, 555, 699, 700, 999):
        assert p.value(t) == pytest.approx(formula(t), abs=1e-12), t
    assert p.value(400) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # halfway through the ramp: 7/8 of the target


def reference_forward(x, m: PstLinear, sparsity: float):
    """The same layer as the released code writes it, autograd only: the mask enters as M + S - stop_grad(S)
    (straight-through), and S's |W'| is not detached, so dL/dS reaches U, V through it."""
    w = m.weight + m.beta * m.pst_U @ m.pst_V
    s = w.abs() + m.alpha1 * m.pst_A @ m.pst_B + m.alpha2 * (m.pst_R[:, None] + m.pst_C[None, :])
    mask = topk_mask(s.detach(), sparsity)
    hard = torch.ones_like(s) if mask is None else mask.to(s.dtype)
    return torch.nn.functional.linear(x, w * (hard + s - s.detach()), m.bias)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])  # 0: no mask yet, but dL/dS still flows (warm-up steps)
def test_straight_through_gradients_reach_every_pst_parameter(sparsity):
    torch.manual_seed(0)
    cfg = PstConfig(rank=3, score_rank=2, alpha1=0.7, alpha2=1.3, beta=0.9)
    base = torch.nn.Linear(10, 6).double()
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    layer = PstLinear(base, Level(sparsity), cfg).double()
    with torch.no_grad():
        for p in (layer.pst_V, layer.pst_B, layer.pst_R, layer.pst_C):
            p.normal_(0, 0.1)
    x = torch.randn(2, 5, 10, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 6, dtype=torch.float64)
    params = [x, layer.pst_U, layer.pst_V, layer.pst_A, layer.pst_B, layer.pst_R, layer.pst_C]

    ours = torch.autograd.grad(((layer(x) - target) ** 2).sum(), params)
    ref = torch.autograd.grad(((reference_forward(x, layer, sparsity) - target) ** 2).sum(), params)
    for name, a, b in zip(["x", "U", "V", "A", "B", "R", "C"], ours, ref):
        assert a.abs().sum() > 0, f"no gradient reaches {name}"
        assert torch.allclose(a, b, atol=1e-10), name
    assert layer.weight.grad is None and layer.bias.grad is None  # frozen


def test_gradients_reach_A_B_R_C_U_V_in_the_model_and_only_they_change():
    _, method, model = build()
    randomize(model)
    method.set_threshold(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**batch()).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if ".pst_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(".pst_" in n or n.startswith(("classifier", "bert.pooler")) for n in trainable)
    assert not any(n.endswith(("query.weight", "query.bias")) for n in trainable)
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0))
    opt.step()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), n


def test_trainable_and_retained_params_by_hand():
    _, method, model = build()
    maps = [(H, H)] * 4 + [(FFN, H), (H, FFN)]  # (out, in): q k v attn_out, ffn_in, ffn_out
    per_map = [(8 + 8) * (o + i) + o + i for o, i in maps]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == LAYERS * sum(per_map) + HEAD
    randomize(model)
    for s in (0.0, 0.9):
        method.set_threshold(s)
        kept = LAYERS * sum(o * i - int(o * i * s) for o, i in maps)
        assert method.retained_params(model) == kept + HEAD
    _, mag, mmodel = build("magnitude")
    mag.set_threshold(0.5)
    total = sum(p.numel() for p in mmodel.parameters())
    assert mag.retained_params(mmodel) == total - LAYERS * sum(int(o * i * 0.5) for o, i in maps)


def test_magnitude_masks_the_smallest_weights_and_trains_everything():
    _, method, model = build("magnitude")
    method.set_threshold(0.5)
    assert all(p.requires_grad for p in model.parameters())
    name, m = pst_modules(model)[0]
    w = m.weight.detach()
    assert torch.equal(m.mask(), w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    model(**batch()).loss.backward()
    assert m.weight.grad is not None and torch.all(m.weight.grad[~m.mask()] == 0)  # pruned weights get no gradient


def test_state_dict_holds_the_schedule_position():
    _, method, _ = build()
    assert method.state_dict() == {"sparsity": 0.9}  # no scheduler: the target from step 0
    method.set_threshold(0.37)
    _, other, model = build()
    other.load_state_dict(method.state_dict())
    assert other.level.value == 0.37 and other.log_values(model)["sparsity"] == 0.37


@pytest.mark.parametrize("override, message", [
    ("method.sparsity=1.0", "method.sparsity` must be in \\[0, 1\\)"),
    ("method.sparsity=-0.1", "method.sparsity` must be in \\[0, 1\\)"),
    ("method.rank=0", "method.rank` must be >= 1"),
])
def test_bad_sparsity_is_a_clear_error(override, message):
    with pytest.raises(UserError, match=message):
        load_run_config(make_cfg(["method=pst", "scheduler=cubic", override]))


def test_overlapping_warmups_are_a_clear_error():
    with pytest.raises(UserError, match="initial_warmup"):
        load_run_config(make_cfg(["method=pst", "scheduler=cubic", "scheduler.initial_warmup=0.6",
                                  "scheduler.final_warmup=0.5"]))
    with pytest.raises(UserError, match="scheduler=cubic drives"):
        load_run_config(make_cfg(["method=lora", "scheduler=cubic"]))


def test_cubic_run_logs_sparsity_and_the_export_reloads_into_plain_transformers(tmp_path, tiny_glue):
    out = tmp_path / "run"
    m = train(make_cfg(fast_overrides(out, tiny_glue, "method=pst", "scheduler=cubic", "method.sparsity=0.75",
                                      "trainer.max_steps=10", "trainer.eval_every=2", "trainer.lr=1e-2",
                                      "trainer.select=last")))
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    run = load_run_config(make_cfg(["method=pst", "scheduler=cubic", "method.sparsity=0.75", "trainer.max_steps=10"]))
    p = plan(run, n_train=40)
    assert [c["step"] for c in curve] == [2, 4, 6, 8, 10]
    for c in curve:  # the sparsity of the last step before the evaluation
        assert c["sparsity"] == pytest.approx(p.value(c["step"] - 1))
    assert curve[0]["retained_params"] > curve[-1]["retained_params"] == m["retained_params"]
    assert curve[-1]["sparsity"] == 0.75
    assert curve[0]["magnitude_overlap"] is None and 0 < curve[-1]["magnitude_overlap"] <= 1

    report = export(out, tmp_path / "export", verify=True)
    assert report["reproduced"] and report["max_abs_diff"] <= 1e-6, report
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export"))
    assert not any("pst_" in n for n, _ in plain.named_parameters())
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    targets = [k for k in weights if k.endswith(("query.weight", "key.weight", "value.weight", "dense.weight"))
               and ".layer." in k]
    assert len(targets) == 6 * LAYERS
    for k in targets:
        n = weights[k].numel()
        assert int((weights[k] == 0).sum()) == int(n * 0.75), k  # measured sparsity == the target
    assert json.loads((tmp_path / "export" / "sparsity.json").read_text())["target"] == 0.75


def test_best_checkpoint_is_chosen_only_at_the_target_sparsity(tmp_path, tiny_glue):
    """As the released run_glue.py: an evaluation from before the cubic schedule settled is no candidate."""
    out = tmp_path / "run"
    m = train(make_cfg(fast_overrides(out, tiny_glue, "method=pst", "scheduler=cubic", "method.sparsity=0.75",
                                      "trainer.max_steps=10", "trainer.eval_every=2", "trainer.lr=1e-2")))
    p = plan(load_run_config(make_cfg(["method=pst", "scheduler=cubic", "method.sparsity=0.75",
                                       "trainer.max_steps=10"])), n_train=40)
    assert [s for s in (2, 4, 6, 8, 10) if p.settled(s)] == [8, 10]  # the target holds from step 7 (0.7 T)
    assert m["best_step"] in (8, 10)
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [c["settled"] for c in curve] == [False, False, False, True, True]  # what the report counts
    metric = next(iter(curve[0]["eval"]))  # the first metric listed selects
    assert m["eval"] == max((c["eval"] for c in curve if c["step"] in (8, 10)), key=lambda e: e[metric])


def test_no_dense_copy_outlives_the_step():
    """Saved for backward: the input, the step's 0/1 mask and the (shared) frozen weight, never a copy of the weight
    (W' is recomputed); and nothing dense stays on the module after the step."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    base.weight.requires_grad_(False)
    layer = PstLinear(base, Level(0.5), PstConfig(rank=2, score_rank=2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(3, 16, requires_grad=True))
    dense = [t for t in saved if t.shape == (8, 16)]
    own = [t for t in dense if t.data_ptr() != layer.weight.data_ptr()]
    assert len(own) == 1 and set(own[0].unique().tolist()) == {0.0, 1.0} and int(own[0].sum()) == 8 * 16 // 2
    y.sum().backward()
    assert not layer._buffers and not any(torch.is_tensor(v) for v in vars(layer).values())
