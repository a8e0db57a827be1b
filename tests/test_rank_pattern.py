"""Per-module ranks and alphas (``lora.rank-pattern`` / ``lora.alpha-pattern``, issue #18).

Pattern ``query=16, value=2`` at reference rank ``lora.r = 8`` with ``value``'s alpha 4 (the
others 16): a client of rank 2/4/8 trains query at 4/8/16, value at 1/1/2, and any other module
at its own rank. Every rule is checked against an independent dense reference computed here
from the factors the clients sent, with each module's own scale ``alpha_m / r_{k,m}``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fl_harness import run_rounds, tiny_config

from fedlora import config
from fedlora.aggregation import (
    ClientUpdate,
    LoraFactors,
    UpdateRejected,
    aggregate,
    mixed_rank_strategies,
    validate_update,
)
from fedlora.aggregation.patterns import ModulePattern, match_key, parse_pattern
from fedlora.errors import ConfigError
from fedlora.learning import builders, lora

ALPHA = 16.0
PATTERN = ModulePattern(8, (("query", 16), ("value", 2)), (("value", 4.0),))
SHAPES = {"layer.0.query": (6, 5), "layer.0.value": (6, 5), "layer.0.key": (6, 5)}
RULES = ("fedit", *mixed_rank_strategies())  # fedit: equal client ranks, mixed module ranks


def module_alpha(module: str) -> float:
    return 4.0 if module.endswith("value") else ALPHA


def random_update(rng: np.random.Generator, client_rank: int, n: int) -> ClientUpdate:
    factors = {}
    for module, (m, k) in SHAPES.items():
        r = PATTERN.rank(module, client_rank)
        factors[module] = LoraFactors(a=rng.normal(size=(r, k)), b=rng.normal(size=(m, r)),
                                      scale=module_alpha(module) / r)
    return ClientUpdate(factors=factors, num_examples=n)


def dense(f: LoraFactors) -> np.ndarray:
    return f.scale * (f.b.astype(np.float64) @ f.a.astype(np.float64))


def reference(rule: str, module: str, factors: list[LoraFactors], p: np.ndarray) -> np.ndarray:
    """The rule's ΔW from its paper's formula, dense, with module ``module``'s own alpha."""
    alpha = module_alpha(module)
    if rule in ("flora", "flexlora"):  # exact: Σ p_k s_k B_k A_k
        return sum(pk * dense(f) for pk, f in zip(p, factors, strict=True))
    if rule == "robust":  # coordinate-wise median of the clients' ΔW_k
        return np.median(np.stack([dense(f) for f in factors]), axis=0)
    if rule == "fedit":  # s (Σ p B)(Σ p A), one rank per module
        r = factors[0].a.shape[0]
        b = sum(pk * f.b for pk, f in zip(p, factors, strict=True))
        a = sum(pk * f.a for pk, f in zip(p, factors, strict=True))
        return alpha / r * b @ a
    if rule == "raflora":  # each rank band averaged over the clients that hold it
        ranks = [f.a.shape[0] for f in factors]
        out, lo = 0.0, 0
        for hi in sorted(set(ranks)):
            holders = [k for k, r in enumerate(ranks) if r >= hi]
            for k in holders:
                f = factors[k]
                w = p[k] / sum(p[j] for j in holders)
                out = out + w * f.scale * f.b[:, lo:hi] @ f.a[lo:hi]
            lo = hi
        return out
    assert rule == "hetlora"  # zero-pad to r_max, weights ∝ ‖ΔW_k‖_F, scale alpha_m / r_max
    r_max = max(f.a.shape[0] for f in factors)
    norms = np.array([np.linalg.norm(dense(f)) for f in factors])
    w = norms / norms.sum()
    m, n = factors[0].b.shape[0], factors[0].a.shape[1]
    a, b = np.zeros((r_max, n)), np.zeros((m, r_max))
    s_g = alpha / r_max
    for wk, f in zip(w, factors, strict=True):
        r = f.a.shape[0]
        a[:r] += wk * f.a
        b[:, :r] += wk * f.scale / s_g * f.b
    return s_g * b @ a


# ----------------------------------------------------------------------------- the pattern


def test_ranks_scale_from_the_reference_rank_and_alphas_are_absolute():
    """At r = lora.r a module gets its pattern rank (peft's own semantics); a client of rank
    r gets ceil(p·r/lora.r), never 0; modules no key matches get r; alphas do not scale."""
    query, value, key = "base_model.model.layer.0.query", "x.value", "layer.0.key"
    assert [PATTERN.rank(query, r) for r in (2, 4, 8)] == [4, 8, 16]
    assert [PATTERN.rank(value, r) for r in (1, 2, 4, 5, 8)] == [1, 1, 1, 2, 2]
    assert [PATTERN.rank(key, r) for r in (2, 4, 8)] == [2, 4, 8]
    assert PATTERN.alpha(value, ALPHA) == 4.0 and PATTERN.alpha(key, ALPHA) == ALPHA
    assert PATTERN.scaled_ranks(4) == (("query", 8), ("value", 1))


def test_keys_match_like_peft_suffix_regex_first_key_wins():
    """``(.*\\.)?(key)$`` on the module name, first key in written order: 'query' matches
    'a.query' but not 'a.myquery'; a regex key selects layers."""
    assert match_key(["query"], "enc.layer.0.query") == "query"
    assert match_key(["query"], "enc.layer.0.myquery") is None
    assert match_key([r"layer\.1\.query", "query"], "enc.layer.1.query") == r"layer\.1\.query"
    assert match_key(["query", r"layer\.1\.query"], "enc.layer.1.query") == "query"
    from peft.utils.other import get_pattern_key  # the rule peft applies when it builds layers

    keys = [r"layer\.1\.query", "query", r"lay.r\.0\.value"]
    for name in ("enc.layer.0.query", "enc.layer.1.query", "enc.layer.1.value",
                 "enc.layer.0.value", "enc.myquery"):
        theirs = get_pattern_key(keys, name)  # peft returns the name itself when none matches
        assert match_key(keys, name) == (theirs if theirs in keys else None), name


@pytest.mark.parametrize("text, message", [
    ("query=0", "positive integer"), ("query=-4", "positive integer"),
    ("query=2.5", "positive integer"), ("query", "module=value"),
    ("query=4,query=8", "given twice"), ("(=4", "not a valid regular expression"),
])
def test_a_bad_rank_pattern_is_refused_with_the_entry_and_the_fix(text, message):
    with pytest.raises(ConfigError, match=message) as err:
        config.from_flat(tiny_config(**{"lora.rank-pattern": text}))
    assert "lora.rank-pattern" in str(err.value)


def test_a_bad_alpha_pattern_is_refused():
    with pytest.raises(ConfigError, match=r"lora.alpha-pattern: .*positive number.*'value=0'"):
        config.from_flat(tiny_config(**{"lora.alpha-pattern": "value=0"}))
    assert parse_pattern("value=2.5", float) == (("value", 2.5),)


def test_a_pattern_above_max_rank_or_with_secure_aggregation_is_refused():
    with pytest.raises(ConfigError, match=r"query=16 gives a rank-8 client rank 16.*max-rank 8"):
        config.from_flat(tiny_config(**{"lora.rank-pattern": "query=16", "max-rank": 8}))
    with pytest.raises(ConfigError, match="not supported with secure-aggregation"):
        config.from_flat(tiny_config(**{"lora.rank-pattern": "query=4",
                                        "secure-aggregation": True}))


def test_a_pattern_key_matching_no_adapted_module_is_refused_at_model_build():
    """'qurey' (a typo) would be silently ignored by peft: refused, naming the modules."""
    cfg = config.from_flat(tiny_config(**{"lora.rank-pattern": "qurey=4"}))
    with pytest.raises(ConfigError, match=r"lora.rank-pattern keys \['qurey'\] match none of "
                                          r"the adapted modules.*like 'query'"):
        lora.build_peft_model(builders.model_spec(cfg), builders.adapter_spec(cfg, 8))


def test_the_client_adapter_is_peft_with_the_scaled_pattern():
    """A rank-4 client's peft model: query rank 8, value rank 1 with scaling 4/1, others 4."""
    cfg = config.from_flat(tiny_config(**{"lora.rank-pattern": "query=16,value=2",
                                          "lora.alpha-pattern": "value=4", "max-rank": 16}))
    model, _ = lora.build_peft_model(builders.model_spec(cfg), builders.adapter_spec(cfg, 4))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self
    assert layer.query.r["default"] == 8 and layer.value.r["default"] == 1
    assert layer.query.scaling["default"] == ALPHA / 8 and layer.value.scaling["default"] == 4.0


def test_validation_checks_each_module_against_its_pattern_rank():
    """A rank-4 client must send value at rank 1: value at rank 4 is RANK_MISMATCH."""
    rng = np.random.default_rng(0)
    good = random_update(rng, 4, 10)
    validate_update(good, SHAPES, max_rank=16, declared_rank=4, pattern=PATTERN)
    bad = dict(good.factors)
    bad["layer.0.value"] = LoraFactors(a=rng.normal(size=(4, 5)), b=rng.normal(size=(6, 4)),
                                       scale=1.0)
    with pytest.raises(UpdateRejected, match=r"layer.0.value'.*expected rank 1") as err:
        validate_update(ClientUpdate(bad, 10), SHAPES, max_rank=16, declared_rank=4,
                        pattern=PATTERN)
    assert err.value.reason == "RANK_MISMATCH"


# ----------------------------------------------------------------------------- every rule


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_aggregates_each_module_at_its_own_rank_and_alpha(rule):
    """Ranks 2/4/8, 2 of 3 sampled (the rank-2 and rank-8 client; fedit: two rank-4 clients).
    The aggregate equals the dense reference per module, and each tier receives each module at
    its pattern rank with scale alpha_m / r_m, carrying what the view promises."""
    rng = np.random.default_rng(7)
    ranks = (4, 4) if rule == "fedit" else (2, 8)
    updates = [random_update(rng, r, n) for r, n in zip(ranks, (30, 10), strict=True)]
    p = np.array([0.75, 0.25])
    result = aggregate(rule, updates, lora_alpha=ALPHA, pattern=PATTERN, max_rank=16, seed=3)
    for module in SHAPES:
        ref = reference(rule, module, [u.factors[module] for u in updates], p)
        got = result.effective_delta(module)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    for tier in ((4,) if rule == "fedit" else (2, 4, 8)):
        received = result.for_client(tier)
        for module, f in received.items():
            r = PATTERN.rank(module, tier)
            assert f.a.shape == (r, 5) and f.b.shape == (6, r), (module, tier)
            assert f.scale == module_alpha(module) / r
        if rule == "flexlora":  # the tier's module is the best rank-r_m approximation of ΔW*
            for module, f in received.items():
                u, s, vt = np.linalg.svd(result.effective_delta(module), full_matrices=False)
                r = min(f.a.shape[0], s.size)
                best = (u[:, :r] * s[:r]) @ vt[:r]
                np.testing.assert_allclose(dense(f), best, atol=1e-9 * s[0])


def test_an_alpha_pattern_needs_an_explicit_lora_alpha():
    """Inferring lora_alpha from the first module's scale is ambiguous under an alpha pattern."""
    updates = [random_update(np.random.default_rng(0), 4, 10)]
    with pytest.raises(ValueError, match="pass lora_alpha"):
        aggregate("fedit", updates, pattern=PATTERN)


@pytest.mark.parametrize(("rule", "optimizer"), [("flexlora", None), ("flora", None),
                                                  ("fedit", "fedadam")])
def test_the_global_adapter_with_a_pattern_round_trips_through_a_checkpoint(rule, optimizer):
    """The server's global adapter (prefix, fresh-init and server-optimizer views) keeps its
    pattern in a checkpoint: every tier gets the same per-module arrays after a restore."""
    from fedlora.aggregation import ServerOptimizer
    from fedlora.federation.global_adapter import GlobalAdapter

    rng = np.random.default_rng(1)
    top = 8
    init = {m: LoraFactors(a=rng.normal(size=(PATTERN.rank(m, top), k)),
                           b=np.zeros((o, PATTERN.rank(m, top))),
                           scale=module_alpha(m) / PATTERN.rank(m, top))
            for m, (o, k) in SHAPES.items()}
    glob = GlobalAdapter(init, {}, ALPHA, False, PATTERN)
    tiers = (4,) if rule == "fedit" else (2, 4, 8)
    updates = [random_update(rng, r, 10) for r in ((4, 4) if rule == "fedit" else (2, 8))]
    result = aggregate(rule, updates, lora_alpha=ALPHA, pattern=PATTERN, max_rank=16, seed=5)
    glob.apply(result, {}, ServerOptimizer(optimizer) if optimizer else None,
               rank=4 if optimizer else None)
    state, arrays = glob.state_dict()
    again = GlobalAdapter.from_state(json.loads(json.dumps(state)), arrays)
    assert again.pattern == PATTERN
    for tier in tiers:
        a, b = glob.arrays_for(tier), again.arrays_for(tier)
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), key
        assert a["layer.0.value.lora_A.weight"].shape[0] == PATTERN.rank("layer.0.value", tier)
        assert a["layer.0.query.lora_A.weight"].shape[0] == PATTERN.rank("layer.0.query", tier)


# ----------------------------------------------------------------------------- in process


def train_messages(grid) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    out = {}
    for msg in grid.delivered:
        if msg.metadata.message_type == "train":
            arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            out[(int(msg.content["config"]["server-round"]), msg.metadata.dst_node_id)] = arrays
    return out


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_in_process_with_partial_participation(rule):
    """Real ServerApp strategy and ClientApp, MiniLM, 3 nodes of ranks 2/4/8 (fedit: 8/8/8),
    2 sampled per round, 2 rounds: every node is sent and sends each module at its pattern
    rank, every reply is accepted, and round 1's aggregate equals the dense reference built
    from the two replies."""
    ranks = "8,8,8" if rule == "fedit" else "2,4,8"
    flat = tiny_config(strategy=rule, rank_by_partition=ranks, num_train_nodes=2,
                       max_rank=16, **{"lora.rank-pattern": "query=16,value=2",
                                       "lora.alpha-pattern": "value=4", "train.local-steps": 1,
                                       "data.samples-per-client": 8, "data.eval-samples": 8})
    replies, results = [], {}

    def hook(_server_model):
        return lambda server_round, glob: results.setdefault(server_round, glob.result)

    records, grid, glob, _ = run_rounds(
        flat, on_reply=lambda m: replies.append(m) if m.metadata.message_type == "train"
        else None, after_round=hook)
    assert [r["num_accepted"] for r in records[1:]] == [2, 2]
    assert all(r["rejected"] == {} for r in records[1:])
    rank_of = {n: int(ranks.split(",")[p]) for p, n in enumerate(sorted(grid.get_node_ids()))}
    sent = train_messages(grid)
    assert len(sent) == 4
    for (_, node), arrays in sent.items():
        for key, value in arrays.items():
            if key.endswith("lora_A.weight"):
                assert value.shape[0] == PATTERN.rank(key[:-len(".lora_A.weight")],
                                                      rank_of[node]), (key, node)
    first = replies[:2]  # round 1's replies
    updates = [{k: v.numpy() for k, v in m.content["arrays"].items()} for m in first]
    n = np.array([m.content["metrics"]["num-examples"] for m in first], dtype=np.float64)
    modules = [k[:-len(".lora_A.weight")] for k in updates[0] if k.endswith("lora_A.weight")]
    assert len(modules) == 2
    for module in modules:
        factors = []
        for arrays in updates:
            a, b = arrays[module + ".lora_A.weight"], arrays[module + ".lora_B.weight"]
            factors.append(LoraFactors(a=a.astype(np.float64), b=b.astype(np.float64),
                                       scale=module_alpha(module) / a.shape[0]))
        ref = reference(rule, module, factors, n / n.sum())
        got = results[1].effective_delta(module)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


# ----------------------------------------------------------------------------- fedlora run


@pytest.mark.slow
@pytest.mark.long
def test_fedlora_run_with_patterns_exports_an_adapter_peft_reloads(tmp_path):
    """`fedlora run` (Flower's simulation) with hetlora, ranks 2/4/8 and both patterns: the
    exported adapter_config.json names each module's rank and alpha, and
    PeftModel.from_pretrained on a fresh base reproduces the server's final metrics."""
    from test_simulation import check_run, fedlora_cli

    out = tmp_path / "run"
    res = fedlora_cli("run", "--num-clients", "3", "--rounds", "2", "--out", str(out), "-c",
                      "strategy='hetlora' rank-by-partition='2,4,8' num-train-nodes=2 "
                      "max-rank=16 lora.rank-pattern='query=16,value=2' "
                      "lora.alpha-pattern='value=4' model.num-hidden-layers=1 "
                      "data.samples-per-client=16 data.eval-samples=32 data.max-length=32 "
                      "train.local-steps=2 train.batch-size=8")
    assert res.returncode == 0, res.stdout + res.stderr
    check_run(out, 2)  # every reply accepted; the reloaded adapter re-evaluates the same
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    ranks = adapter["rank_pattern"]
    assert adapter["r"] == max([adapter["r"], *ranks.values()])
    assert any("value" in k for k in ranks) and all(
        adapter["alpha_pattern"][k] == r for k, r in ranks.items())  # scale 1 per module
