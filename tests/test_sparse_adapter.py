"""SparseAdapter: the pruners' maths on a 2-layer toy, exact densities on tiny BERT, masks that hold through training
(weight decay included) and a kill-and-resume, the adapter placements, exact retained parameters and export."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import fast_overrides, make_cfg
from sparse_peft import UserError, runio
from sparse_peft.config import load_run_config
from sparse_peft.loop import optimizer_step
from sparse_peft.methods.adapter import AdapterConfig, AdapterLinear
from sparse_peft.methods.sparse_adapter import PRUNERS, prune, prune_scores, top_masks
from sparse_peft.train import train
from test_methods import build

# --- the pruners on a 2-layer linear toy: y = W2 W1 x, L = 0.5 ||y - t||^2 --------------------------------------


class Toy(nn.Module):
    def __init__(self, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(0.3 * torch.randn(3, 4, generator=g, dtype=dtype))  # (h, d)
        self.w2 = nn.Parameter(0.3 * torch.randn(2, 3, generator=g, dtype=dtype))  # (o, h)

    def forward(self, x, labels):
        y = x @ self.w1.T @ self.w2.T  # (B, o)
        return SimpleNamespace(loss=0.5 * ((y - labels) ** 2).sum(), logits=y)


def toy_batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [dict(x=torch.randn(5, 4, generator=g, dtype=torch.float64),
                 labels=torch.randn(5, 2, generator=g, dtype=torch.float64)) for _ in range(n)]


def toy_grads(toy, batches):
    """dL/dW by hand: r = y - t, h = W1 x; dL/dW2 = r^T h, dL/dW1 = (r W2)^T x; summed over the batches."""
    g1, g2 = torch.zeros_like(toy.w1), torch.zeros_like(toy.w2)
    with torch.no_grad():
        for b in batches:
            h = b["x"] @ toy.w1.T
            r = h @ toy.w2.T - b["labels"]
            g2 += r.T @ h
            g1 += (r @ toy.w2).T @ b["x"]
    return g1, g2


def test_mag_and_snip_scores_by_hand():
    toy, batches = Toy(), toy_batches()
    weights = {"w1": toy.w1, "w2": toy.w2}
    mag = prune_scores("mag", toy, weights, batches)
    assert torch.equal(mag["w1"], toy.w1.detach().abs()) and torch.equal(mag["w2"], toy.w2.detach().abs())
    g1, g2 = toy_grads(toy, batches)
    snip = prune_scores("snip", toy, weights, batches)
    assert torch.allclose(snip["w1"], (g1 * toy.w1).abs(), atol=1e-12)
    assert torch.allclose(snip["w2"], (g2 * toy.w2).abs(), atol=1e-12)
    assert toy.w1.grad is None and toy.w2.grad is None  # scoring leaves no gradients behind


def test_grasp_scores_are_w_times_hessian_gradient():
    toy, batches = Toy(), toy_batches()
    scores = prune_scores("grasp", toy, {"w1": toy.w1, "w2": toy.w2}, batches)
    # H g by central differences of the hand gradient along g
    g1, g2 = toy_grads(toy, batches)
    eps = 1e-6
    with torch.no_grad():
        toy.w1 += eps * g1
        toy.w2 += eps * g2
    p1, p2 = toy_grads(toy, batches)
    with torch.no_grad():
        toy.w1 -= 2 * eps * g1
        toy.w2 -= 2 * eps * g2
    m1, m2 = toy_grads(toy, batches)
    with torch.no_grad():
        toy.w1 += eps * g1
        toy.w2 += eps * g2
    hg1, hg2 = (p1 - m1) / (2 * eps), (p2 - m2) / (2 * eps)
    assert torch.allclose(scores["w1"], toy.w1.detach() * hg1, rtol=1e-5, atol=1e-8)
    assert torch.allclose(scores["w2"], toy.w2.detach() * hg2, rtol=1e-5, atol=1e-8)


def grad_norm(toy, batches):
    g = [torch.zeros_like(toy.w1), torch.zeros_like(toy.w2)]
    for b in batches:
        g = [a + c for a, c in zip(g, torch.autograd.grad(toy(**b).loss, [toy.w1, toy.w2]))]
    return sum((x ** 2).sum() for x in g).item()


def test_grasp_sign_removes_the_weights_whose_removal_keeps_the_gradient_flow():
    # GraSP's score of removing w_q is S = -w_q (Hg)_q, the first-order change of ||g||^2 / 2: it removes the
    # largest S, i.e. the smallest w Hg (the reference scores w Hg and removes the smallest: the same). The
    # opposite sign would remove the smallest S, cutting the gradient flow instead.
    toy, batches = Toy(), toy_batches(1)
    weights = {"w1": toy.w1, "w2": toy.w2}
    s = prune_scores("grasp", toy, weights, batches)
    removal = -torch.cat([s["w1"].flatten(), s["w2"].flatten()])  # GraSP's S
    base, exact = grad_norm(toy, batches), []
    for w in (toy.w1, toy.w2):  # the exact change of ||g||^2 when one weight is zeroed
        for i in range(w.numel()):
            old = w.data.view(-1)[i].item()
            w.data.view(-1)[i] = 0.0
            exact.append(grad_norm(toy, batches) - base)
            w.data.view(-1)[i] = old
    exact = torch.tensor(exact, dtype=removal.dtype)
    assert torch.corrcoef(torch.stack([removal, exact]))[0, 1] > 0.9
    masks = {n: torch.ones_like(w) for n, w in weights.items()}
    first_out = top_masks(s, masks, (removal.numel() - 1) / removal.numel(), "global")
    assert torch.cat([first_out["w1"].flatten(), first_out["w2"].flatten()]).argmin() == exact.argmax()

    def pruned_norm(flip: bool):
        t = Toy()
        w = {"w1": t.w1, "w2": t.w2}
        sc = {n: -v if flip else v for n, v in prune_scores("grasp", t, w, batches).items()}
        new = top_masks(sc, {n: torch.ones_like(v) for n, v in w.items()}, 0.5, "global")
        with torch.no_grad():
            for n in w:
                w[n].mul_(new[n])
        return grad_norm(t, batches)

    assert pruned_norm(flip=False) > pruned_norm(flip=True)


def test_top_masks_exact_counts_and_pruned_entries_stay_out():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0, 30.0)}
    masks = {n: torch.ones_like(s) for n, s in scores.items()}
    g = top_masks(scores, masks, 0.5, "global")
    assert g["a"].sum() == 0 and g["b"].sum() == 15  # one ranking: the 15 largest are all in b
    loc = top_masks(scores, masks, 0.5, "local")
    assert loc["a"].tolist() == [0] * 5 + [1] * 5 and loc["b"].sum() == 10
    masks["b"][-1] = 0  # pruned in an earlier round: never comes back, whatever its score
    assert top_masks(scores, masks, 0.5, "global")["b"][-1] == 0


def test_iterative_pruning_reaches_the_density_through_the_rounds():
    toy, batches = Toy(), toy_batches()
    weights = {"w1": toy.w1, "w2": toy.w2}
    masks = {n: torch.ones_like(w) for n, w in weights.items()}
    prune(toy, weights, masks, batches, "snip", sparsity=0.5, scope="global", iterations=3)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * 18)
    assert all(torch.equal(w.detach() == 0, m == 0) for w, m in zip(weights.values(), masks.values()))


# --- tiny BERT -----------------------------------------------------------------------------------------------------
def tiny_batches(n=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 1000, (4, 12), generator=g)
        out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1])))
    return out


def pruned_tiny(*extra):
    base, meth = build("sparse_adapter", "tiny_bert", *extra)
    model = meth.inject(base)
    meth.on_train_start(model, tiny_batches())
    return model, meth


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("pruner", PRUNERS)
def test_every_pruner_hits_the_density(pruner, scope):
    model, meth = pruned_tiny(f"method.pruner={pruner}", f"method.mask_scope={scope}", "method.sparsity=0.4")
    weights, masks = meth.weights_and_masks()
    assert len(masks) == 2 * 4  # down + up at 4 sites (2 layers x attention output, FFN output)
    total = sum(m.numel() for m in masks.values())  # 4 x 2 x 32 x 64
    assert total == 16384
    if scope == "global":
        assert sum(int(m.sum()) for m in masks.values()) == round(0.6 * total)
    else:
        assert all(int(m.sum()) == round(0.6 * m.numel()) for m in masks.values())
    assert all(torch.equal(weights[n].detach() == 0, m == 0) for n, m in masks.items())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert meth.retained_params(model) == trainable - sum(int((m == 0).sum()) for m in masks.values())


def test_magnitude_overlap_tells_a_data_driven_mask_from_magnitude_and_chance():
    overlap = {}
    for pruner in ("mag", "rand", "snip"):
        model, meth = pruned_tiny(f"method.pruner={pruner}", "method.sparsity=0.4")
        overlap[pruner] = meth.log_values(model)["magnitude_overlap"]
        assert meth.log_values(model)["magnitude_overlap_chance"] == 0.4
    assert overlap["mag"] == 1.0
    assert abs(overlap["rand"] - 0.4) < 0.03  # 6,554 pruned of 16,384: the standard error is about 0.006
    # SNIP's pruned set by hand: the 40% smallest |g * w| against the 40% smallest |w| (bert init, global ranking)
    base, meth = build("sparse_adapter", "tiny_bert", "method.pruner=snip", "method.sparsity=0.4")
    model = meth.inject(base)
    weights, _ = meth.weights_and_masks()
    model.eval()
    loss = sum(model(**b).loss for b in tiny_batches())
    grads = torch.autograd.grad(loss, list(weights.values()))
    snip = torch.cat([(g * w).detach().abs().flatten() for g, w in zip(grads, weights.values())])
    mag = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    n_pruned = snip.numel() - round(0.6 * snip.numel())
    by_snip = set(snip.topk(n_pruned, largest=False).indices.tolist())
    by_mag = set(mag.topk(n_pruned, largest=False).indices.tolist())
    assert overlap["snip"] == pytest.approx(len(by_snip & by_mag) / n_pruned, abs=2e-3)  # ties at the threshold
    assert 0.4 + 0.03 < overlap["snip"] < 1.0


def test_pruned_weights_stay_exactly_zero_with_weight_decay():
    model, meth = pruned_tiny("method.pruner=mag", "method.sparsity=0.6")
    weights, masks = meth.weights_and_masks()
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("adapter_down.bias")}
    optimizer = torch.optim.AdamW(meth.param_groups(model, 1e-2, 0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step, batch in enumerate(tiny_batches(5)):
        model(**batch).loss.backward()
        assert all((weights[n].grad[m == 0] == 0).all() for n, m in masks.items())  # masked forward: no gradient
        optimizer_step(model, meth, optimizer, scheduler, 1.0, step)
    assert all((weights[n][m == 0] == 0).all() for n, m in masks.items())
    assert all((weights[n][m == 1] != 0).all() for n, m in masks.items())
    assert any(not torch.equal(p, biases[n]) for n, p in model.named_parameters() if n in biases)  # biases train
    with torch.no_grad():  # whatever moves a pruned weight, the hook after the optimizer step zeroes it again
        for w in weights.values():
            w.add_(1.0)
    meth.after_optimizer_step(model, optimizer, 5)
    assert all((weights[n][m == 0] == 0).all() for n, m in masks.items())


def test_mask_state_round_trips_through_torch_load(tmp_path):
    model, meth = pruned_tiny("method.pruner=rand")
    torch.save(meth.state_dict(), tmp_path / "m.pt")
    _, masks = meth.weights_and_masks()
    base, fresh = build("sparse_adapter", "tiny_bert", "method.pruner=rand")
    fresh_model = fresh.inject(base)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    weights2, masks2 = fresh.weights_and_masks()
    assert all(torch.equal(masks[n], masks2[n]) for n in masks)
    assert all((weights2[n][masks2[n] == 0] == 0).all() for n in masks2)
    assert fresh.retained_params(fresh_model) == meth.retained_params(model)
    assert fresh.log_values(fresh_model) == meth.log_values(model)  # the mask's magnitude overlap too


def test_placements_and_sizes_count_by_hand():
    head = 32 * 32 + 32 + 32 * 2 + 2  # pooler + classifier

    def site(b, d=32):
        return 2 * d * b + b + d

    for extra, expected in [
        ((), 4 * site(64)),  # houlsby, 64 at both sites: what method=adapter trains
        (("method.attn_size=16", "method.ffn_size=8"), 2 * site(16) + 2 * site(8)),
        (("method.placement=parallel",), 2 * site(64)),
        (("method.placement=pfeiffer", "method.ffn_size=8"), 2 * site(8)),
        (("method.learnable_scale=true",), 4 * (site(64) + 1)),
        (("method.layernorm=in",), 4 * (site(64) + 2 * 32)),  # + the adapter LayerNorm's weight and bias
    ]:
        base, meth = build("adapter", "tiny_bert", *extra)
        model = meth.inject(base)
        assert meth.retained_params(model) == expected + head, extra
    norm_ids = {id(p) for n, p in model.named_parameters() if ".adapter_norm." in n}
    assert len(norm_ids) == 8 and norm_ids <= {id(p) for p in meth.param_groups(model, 1e-3, 0.1)[1]["params"]}
    base, meth = build("adapter", "tiny_bert", "method.learnable_scale=true")
    model = meth.inject(base)
    groups = meth.param_groups(model, 1e-3, 0.1)
    scale_ids = {id(p) for n, p in model.named_parameters() if n.endswith("adapter_scale")}
    assert len(scale_ids) == 4 and scale_ids <= {id(p) for p in groups[1]["params"]}  # no weight decay
    base, meth = build("adapter", "tiny_bert", "method.placement=pfeiffer")
    model = meth.inject(base)
    decayed = {id(p) for p in meth.param_groups(model, 1e-3, 0.1)[0]["params"]}
    for n, p in model.named_parameters():  # a pfeiffer adapter sits inside `output.LayerNorm`: its weights still decay
        if ".adapter_" in n:
            assert (id(p) in decayed) == n.endswith("weight"), n


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_deberta"])
@pytest.mark.parametrize("placement", ["houlsby", "parallel", "pfeiffer"])
def test_every_placement_starts_as_the_identity_with_lora_init(placement, model):
    base, _ = build("full", model)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    base2, meth = build("sparse_adapter", model, "method.init=lora", f"method.placement={placement}")
    base2.load_state_dict(ref)
    adapted = meth.inject(base2).eval()
    ids = torch.randint(5, 1000, (2, 9))
    assert torch.allclose(adapted(input_ids=ids).logits, base.eval()(input_ids=ids).logits, atol=1e-6)
    if placement == "parallel":  # the adapter reads the FFN's input, not the output map's
        seen = {}
        for name, site in meth.sites.items():
            ffn_in = adapted.get_submodule(name.replace("output.dense", "intermediate.dense"))
            ffn_in.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, [a[0]]))
            site.adapter = lambda h, f=site.adapter, name=name: (seen[name].append(h), f(h))[1]
        adapted(input_ids=ids)
        assert len(seen) == 2 and all(len(v) == 2 and v[0] is v[1] for v in seen.values())
    with torch.no_grad():  # and the adapter is in the forward: a non-zero up-projection changes the output
        for site in meth.sites.values():
            site.adapter_up.weight.normal_(std=0.1)  # not a constant: LayerNorm would remove a uniform shift
    hidden = [m(input_ids=ids, output_hidden_states=True).hidden_states[-1] for m in (adapted, base)]
    assert not torch.allclose(*hidden, atol=1e-3)


@pytest.mark.parametrize("where", ["in", "out"])
def test_adapter_layernorm_in_or_out_by_hand(where):
    """in (the SparseAdapter scripts): h + up(relu(down(LN(h)))); out: h + LN(up(relu(down(h)))); the residual adds
    the un-normalised h either way."""
    torch.manual_seed(0)
    cfg = AdapterConfig(adapter_size=3, layernorm=where)
    site = AdapterLinear(nn.Linear(5, 4), 4, 3, cfg).eval()
    with torch.no_grad():
        site.adapter_norm.weight.normal_()
        site.adapter_norm.bias.normal_()
    x = torch.randn(2, 5)
    h = site.base_layer(x)
    ln = lambda v: torch.nn.functional.layer_norm(v, (4,), site.adapter_norm.weight, site.adapter_norm.bias)
    down = lambda v: torch.relu(v @ site.adapter_down.weight.T + site.adapter_down.bias)
    up = lambda v: v @ site.adapter_up.weight.T + site.adapter_up.bias
    expected = h + (up(down(ln(h))) if where == "in" else ln(up(down(h))))
    assert torch.allclose(site(x), expected, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    ("method.sparsity=1.0", "fraction of adapter weights removed"), ("method.sparsity=-0.1", "in \\[0, 1\\)"),
    ("method.pruner=l1", "pruner=l1"), ("method.adapter_size=0", "adapter_size"), ("method.attn_size=0", "attn_size"),
    ("method.mask_scope=layer", "mask_scope"), ("method.placement=serial", "placement"),
    ("method.prune_iterations=0", "prune_iterations"), ("method.layernorm=pre", "layernorm"),
])
def test_bad_input_is_a_clear_error_at_start(bad, match):
    with pytest.raises(UserError, match=match):
        load_run_config(make_cfg(["method=sparse_adapter", bad]))


# --- through sparse_peft.train ---------------------------------------------------------------------------------------
ADAPTER_WEIGHTS = 4 * 2 * 32 * 64  # tiny_bert, houlsby, 64 at both sites


def test_trains_and_reports_exact_retained_params(tmp_path, tiny_glue):
    out = tmp_path / "run"
    m = train(make_cfg(fast_overrides(out, tiny_glue, "method=sparse_adapter", "method.pruner=snip",
                                      "method.sparsity=0.4", "task=glue/mrpc")))
    removed = ADAPTER_WEIGHTS - round(0.6 * ADAPTER_WEIGHTS)
    assert m["steps"] == 2 and m["retained_params"] == m["trainable_params"] - removed
    curve = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
    assert all(c["retained_params"] == m["retained_params"] for c in curve)
    assert all(0.4 <= c["magnitude_overlap"] <= 1.0 for c in curve if c["type"] == "eval")
    saved = load_file(str(out / "model.safetensors"))
    zeros = sum(int((v == 0).sum()) for k, v in saved.items() if k.endswith(("adapter_down.weight", "adapter_up.weight")))
    assert zeros == removed

    from sparse_peft.export import export
    export(out, tmp_path / "export")
    masks = load_file(str(tmp_path / "export" / "masks.safetensors"))
    info = json.loads((tmp_path / "export" / "sparse_adapter.json").read_text())
    assert sum(int(v.sum()) for v in masks.values()) == ADAPTER_WEIGHTS - removed
    assert info["retained_params"] == m["retained_params"] and info["sparsity"] == 0.4


def test_sparsity_zero_trains_exactly_the_dense_adapter(tmp_path, tiny_glue):
    a = train(make_cfg(fast_overrides(tmp_path / "a", tiny_glue, "method=adapter")))
    s = train(make_cfg(fast_overrides(tmp_path / "s", tiny_glue, "method=sparse_adapter", "method.sparsity=0")))
    assert a["eval"] == s["eval"] and a["trainable_params"] == s["trainable_params"] == s["retained_params"]
    wa, ws = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "s" / "model.safetensors"))
    assert wa.keys() == ws.keys() and all(torch.equal(wa[k], ws[k]) for k in wa)


class Crash(Exception):
    pass


def test_resume_restores_the_masks_and_reproduces_an_uninterrupted_run(tmp_path, tiny_glue, monkeypatch):
    steps = ["method=sparse_adapter", "method.pruner=snip", "method.sparsity=0.5", "trainer.weight_decay=0.1",
             "trainer.max_steps=6", "trainer.save_every=2", "data.max_train_samples=24"]

    def run(out):
        return train(make_cfg(fast_overrides(out, tiny_glue, *steps)))

    ref = run(tmp_path / "ref")
    real_curve = runio.RunLogger.curve

    def crash_at_5(self, record):
        real_curve(self, record)
        if record["step"] == 5:
            raise Crash

    out = tmp_path / "resumed"
    monkeypatch.setattr(runio.RunLogger, "curve", crash_at_5)
    with pytest.raises(Crash):
        run(out)
    assert (out / "checkpoints" / "last").is_dir()
    monkeypatch.setattr(runio.RunLogger, "curve", real_curve)
    # a resumed run restores the masks from the checkpoint; pruning again would be an error here
    from sparse_peft.methods.sparse_adapter import SparseAdapter
    monkeypatch.setattr(SparseAdapter, "on_train_start", lambda *a: (_ for _ in ()).throw(AssertionError("re-pruned")))
    resumed = run(out)
    assert resumed["eval"] == ref["eval"] and resumed["retained_params"] == ref["retained_params"]
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mask_overlap_script_counts_shared_pruned_weights(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("mask_overlap", Path(__file__).parents[1] / "scripts" / "mask_overlap.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # Hydra-style dir names hold '=': a labelled one keeps its label, an unlabelled one is named by its dir
    a, b = "method.pruner=snip,trainer.seed=0", "method.pruner=rand,trainer.seed=0"
    kept = {a: [[1, 1, 0, 0], [1, 1, 1, 1]], b: [[1, 0, 1, 0], [0, 1, 1, 1]]}  # a prunes 2, b prunes 3; 1 shared
    for name, rows in kept.items():
        (tmp_path / name).mkdir()
        masks = {f"m{i}": torch.tensor(r, dtype=torch.bool) for i, r in enumerate(rows)}
        torch.save({"masks": masks, "magnitude_overlap": 0.5}, tmp_path / name / "method_state.pt")
    script.main([f"snip={tmp_path / a}", str(tmp_path / b)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| snip | 1.000 | 0.500 | 0.500 | 0.50-1.00 |"
    assert lines[3] == f"| {b} | 0.333 | 1.000 | 0.500 | 0.50-0.75 |"
