"""Model loading, the π₀ reference, and reward/value scoring (distalign.lm.models / .scoring)."""

from __future__ import annotations

import pytest
import torch

from distalign.errors import ConfigError
from distalign.lm.logprobs import sequence_logprobs, token_logprobs
from distalign.lm.models import (
    LoraConfig,
    ModelConfig,
    apply_lora,
    load_policy,
    load_reward_model,
    load_scorer,
    load_tokenizer,
    load_value_model,
)
from distalign.lm.reference import Reference
from distalign.lm.scoring import sequence_scores, token_scores
from distalign.testing import (
    left_pad,
    save_tiny,
    save_tiny_checkpoint,
    tiny_causal_lm,
    tiny_reward_model,
    tiny_tokenizer,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved tiny causal LM + tokenizer, seed 0."""
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("policy"), seed=0))


@pytest.fixture(scope="module")
def batch():
    tok = tiny_tokenizer()
    ids, attn = left_pad(
        [tok("what is a good name for a cat").input_ids, tok("the dog").input_ids],
        tok.pad_token_id,
    )
    return ids, attn


def _sgd_step(policy, ids, attn, lr=0.5):
    """One update that moves the policy: ascend the log-likelihood of ``ids``."""
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    policy.train()
    loss = -sequence_logprobs(policy, ids, attn, attn).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_lora_reference_is_adapter_disabled_base_even_after_training(ckpt, batch):
    ids, attn = batch
    # eager attention, as in tiny_causal_lm, so that "equal" can mean bit-equal
    cfg = ModelConfig(
        name_or_path=ckpt, attn_implementation="eager", lora=LoraConfig(enabled=True, r=4, alpha=8)
    )
    policy = load_policy(cfg)
    ref = Reference.from_config(policy, cfg)
    assert ref.is_adapter_disabled and ref.model is None  # no second copy held
    base = tiny_causal_lm(tiny_tokenizer(), seed=0)
    expected = token_logprobs(base, ids, attn, temperature=0.7)

    _sgd_step(policy, ids, attn)
    with torch.no_grad():
        moved = token_logprobs(policy, ids, attn, temperature=0.7)
    assert (moved - expected).abs().max() > 1e-3  # the adapter really changed π
    assert policy.training  # the reference call must restore the mode it found
    # DataParallel stands in for DDP: both expose the model as `.module`
    got = ref.token_logprobs(torch.nn.DataParallel(policy), ids, attn, temperature=0.7)
    assert policy.training
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_frozen_reference_copy_does_not_move(ckpt, batch):
    ids, attn = batch
    cfg = ModelConfig(name_or_path=ckpt)
    policy = load_policy(cfg)
    ref = Reference.from_config(policy, cfg)
    assert not ref.is_adapter_disabled and ref.model is not policy
    assert not any(p.requires_grad for p in ref.model.parameters())
    before = ref.token_logprobs(policy, ids, attn)
    torch.testing.assert_close(before, token_logprobs(policy, ids, attn), rtol=0, atol=0)

    _sgd_step(policy, ids, attn)
    after = ref.token_logprobs(None, ids, attn)  # a frozen copy does not need the policy
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with torch.no_grad():
        assert (token_logprobs(policy, ids, attn) - before).abs().max() > 1e-3


def test_explicit_ref_model_is_loaded_even_with_lora(ckpt, batch, tmp_path):
    ids, attn = batch
    other = str(save_tiny_checkpoint(tmp_path, seed=1))
    cfg = ModelConfig(
        name_or_path=ckpt,
        ref_model=other,
        attn_implementation="eager",
        lora=LoraConfig(enabled=True, r=2),
    )
    policy = load_policy(cfg)
    ref = Reference.from_config(policy, cfg).to("cpu")
    assert not ref.is_adapter_disabled
    expected = token_logprobs(tiny_causal_lm(tiny_tokenizer(), seed=1), ids, attn)
    torch.testing.assert_close(ref.token_logprobs(policy, ids, attn), expected)
    seq = ref.sequence_logprobs(policy, ids, attn, attn)
    torch.testing.assert_close(seq, (expected * attn).sum(-1))


def test_in_memory_policy_reference_is_a_deep_copy(batch):
    ids, attn = batch
    policy = tiny_causal_lm(tiny_tokenizer(), seed=3)
    ref = Reference.from_config(policy, ModelConfig())
    before = ref.token_logprobs(policy, ids, attn)
    _sgd_step(policy, ids, attn)
    torch.testing.assert_close(ref.token_logprobs(policy, ids, attn), before, rtol=0, atol=0)


def test_load_policy_errors_are_one_line_config_errors(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="no-such-model") as err:
        load_policy(ModelConfig(name_or_path=missing))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="name_or_path"):
        load_policy(ModelConfig())
    with pytest.raises(ConfigError, match="dtype"):
        load_policy(ModelConfig(name_or_path=missing, dtype="float8"))
    with pytest.raises(ConfigError, match="no-such-model"):
        load_tokenizer(ModelConfig(name_or_path=missing))


def test_load_policy_options(ckpt):
    policy = load_policy(
        ModelConfig(name_or_path=ckpt, dtype="bfloat16", gradient_checkpointing=True)
    )
    assert policy.dtype == torch.bfloat16
    layers = policy.model.layers
    assert all(layer.gradient_checkpointing for layer in layers) and not policy.config.use_cache


def test_load_tokenizer_pads_with_eos_when_missing(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    save_tiny(tok, tmp_path)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token_id == loaded.eos_token_id == tok.eos_token_id


def test_load_scorer_from_causal_lm_keeps_backbone_and_adds_head(ckpt):
    rm = load_scorer(ckpt, ModelConfig(), num_labels=1)
    lm = tiny_causal_lm(tiny_tokenizer(), seed=0)
    torch.testing.assert_close(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert rm.score.weight.shape == (1, 32)
    assert rm.config.pad_token_id == tiny_tokenizer().pad_token_id


def test_reward_and_value_model_loading(tmp_path):
    rm_path = str(save_tiny_checkpoint(tmp_path, seed=7, reward=True))
    rm = load_reward_model(ModelConfig(reward_model=rm_path))
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    vm = load_value_model(ModelConfig(reward_model=rm_path))  # value_model=None → from the RM
    assert all(p.requires_grad for p in vm.parameters())
    torch.testing.assert_close(vm.score.weight, rm.score.weight)
    with pytest.raises(ConfigError, match="reward_model"):
        load_reward_model(ModelConfig())
    with pytest.raises(ConfigError, match="value_model"):
        load_value_model(ModelConfig())


# --- scoring -------------------------------------------------------------------------------


def _hf_last_token_score(rm, seq: list[int]) -> torch.Tensor:
    """Independent reference: HF's own pooled logit on the unpadded sequence, with a pad id
    that does not occur in it, so HF pools exactly the last token."""
    saved = rm.config.pad_token_id
    rm.config.pad_token_id = 3  # <unk>, never in these sequences
    try:
        with torch.no_grad():
            return rm(input_ids=torch.tensor([seq])).logits[0, 0]
    finally:
        rm.config.pad_token_id = saved


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_sequence_scores_use_last_real_token(pad_is_eos):
    tok = tiny_tokenizer(pad_is_eos=pad_is_eos)
    rm = tiny_reward_model(tok, seed=0)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    prompts = [tok("what is your name").input_ids, tok("the sun").input_ids]
    early = tok("the sun is big").input_ids + [eos]  # (a) ended early with EOS
    never = tok("the moon is good and the sun is big").input_ids  # (b) hit the length limit
    p_ids, p_attn = left_pad(prompts, pad)
    width = max(len(early), len(never))
    resp = torch.full((2, width), pad)
    rmask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate([early, never]):
        resp[i, : len(r)] = torch.tensor(r)
        rmask[i, : len(r)] = 1
    ids = torch.cat([p_ids, resp], 1)
    attn = torch.cat([p_attn, rmask], 1)
    response_mask = torch.cat([torch.zeros_like(p_attn), rmask], 1)

    got = sequence_scores(rm, ids, attn, response_mask)
    expected = torch.stack(
        [_hf_last_token_score(rm, prompts[0] + early), _hf_last_token_score(rm, prompts[1] + never)]
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # attention_mask alone gives the same index (no padding inside the response)
    torch.testing.assert_close(sequence_scores(rm, ids, attn), got)
    # token_scores are one value per position and agree with the gathered scores
    ts = token_scores(rm, ids, attn)
    assert ts.shape == ids.shape and ts.dtype == torch.float32
    last_early = p_ids.shape[1] + len(early) - 1
    torch.testing.assert_close(ts[0, last_early], got[0])
    if pad_is_eos:
        # the trap: HF's id-based pooling skips the EOS (== pad) and scores the token before it
        with torch.no_grad():
            hf = rm(input_ids=ids, attention_mask=attn).logits[0, 0]
        torch.testing.assert_close(hf, ts[0, last_early - 1])
        assert not torch.isclose(hf, got[0])


def test_token_scores_ignore_left_padding():
    tok = tiny_tokenizer()
    rm = tiny_reward_model(tok, seed=2)
    seq = tok("what is a good name for a dog").input_ids
    ids, attn = left_pad([seq, seq[:3]], tok.pad_token_id)
    alone = token_scores(rm, torch.tensor([seq[:3]]), torch.ones(1, 3, dtype=torch.long))
    padded = token_scores(rm, ids, attn)
    torch.testing.assert_close(padded[1, -3:], alone[0], rtol=1e-5, atol=1e-5)


def test_token_scores_through_peft_seq_cls_adapter():
    tok = tiny_tokenizer()
    base = tiny_reward_model(tok, seed=0)
    ids, attn = left_pad([tok("the cat is good").input_ids], tok.pad_token_id)
    expected = token_scores(base, ids, attn)
    peft_rm = apply_lora(tiny_reward_model(tok, seed=0), LoraConfig(enabled=True, r=2), "SEQ_CLS")
    # LoRA starts as the identity (B = 0), so scores match the base model exactly
    torch.testing.assert_close(token_scores(peft_rm, ids, attn), expected)
    # and the trained head copy is the one used: changing it changes the scores
    head = peft_rm.get_base_model().score
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    assert (token_scores(peft_rm, ids, attn) - expected).abs().max() > 1e-3


def test_chat_template_override_from_text_or_file(ckpt, tmp_path):
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    msgs = [{"role": "user", "content": "the cat"}]
    tok = load_tokenizer(ModelConfig(name_or_path=ckpt, chat_template=template))
    assert tok.apply_chat_template(msgs, tokenize=False) == "[the cat]"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    tok = load_tokenizer(ModelConfig(name_or_path=ckpt, chat_template=str(path)))
    assert tok.apply_chat_template(msgs, tokenize=False) == "[the cat]"
    with pytest.raises(ConfigError, match="model.chat_template"):
        load_tokenizer(ModelConfig(name_or_path=ckpt, chat_template=str(tmp_path / "no.jinja")))


# --- where a name points: local path, run directory or hub id (distalign.lm.sources) -------


def test_a_run_directory_stands_for_its_final_everywhere(tmp_path):
    from distalign.eval.generate import resolve_model
    from distalign.eval.judges.reward import resolve_model_dir
    from distalign.lm.sources import resolve_model_path

    run = tmp_path / "rm"
    final = save_tiny_checkpoint(run / "final", seed=7, reward=True)
    (run / "config.yaml").write_text("method: reward\n")
    (run / "metrics.jsonl").write_text("")
    assert resolve_model_path(str(run)) == str(final) == resolve_model_dir(str(run))
    assert resolve_model(str(run), None)[0] == str(final.resolve())
    rm = load_reward_model(ModelConfig(reward_model=str(run)))  # the run dir, not run/final
    torch.testing.assert_close(rm.score.weight, load_scorer(str(final), ModelConfig()).score.weight)
    assert load_value_model(ModelConfig(value_model=str(run))) is not None
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("method: reward\n")
    (unfinished / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="run directory without final/"):
        load_reward_model(ModelConfig(reward_model=str(unfinished)))


@pytest.mark.parametrize(("name", "local"), [
    ("tinyy", False), ("org/name", False), ("Qwen/Qwen2.5-0.5B", False),
    ("teknium/OpenHermes-2.5", False), ("pref.jsonll", True), ("model.gguf", True),
    ("./x", True), ("../x", True), ("~/x", True), ("/x", True), ("a/b/c", True),
    ("here/x", True),  # one "/" under an existing directory
])
def test_what_looks_like_a_local_path(name, local, tmp_path, monkeypatch):
    from distalign.lm.sources import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert looks_local(name) is local


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from distalign.lm.sources import check_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    check_hub.cache_clear()
    yield
    check_hub.cache_clear()


def test_a_typo_is_one_line_with_the_closest_local_names(ckpt, tmp_path, monkeypatch,
                                                         empty_hub_cache):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)
    (tmp_path / "policy").symlink_to(ckpt)
    with pytest.raises(ConfigError, match=r"'./polcy': no such directory \(did you mean policy"):
        load_policy(ModelConfig(name_or_path="./polcy"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"tokenizer 'polcy' is not a local path \(did you mean "
                                          r"policy\?\) and not in the HF cache \(HF_HUB_OFFLINE"):
        load_tokenizer(ModelConfig(name_or_path="polcy"))


def test_a_hub_name_is_probed_with_one_short_request(tmp_path, monkeypatch, empty_hub_cache):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from distalign.lm.sources import check_source

    calls = []

    def no_network(self, name, **kwargs):
        calls.append((name, kwargs))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    for _ in range(2):  # one request each time (a failure is not cached), no retries
        with pytest.raises(ConfigError, match=r"hub cannot be reached \(\[Errno -2\]"):
            check_source("org/nothing", "policy")
    assert len(calls) == 2 and calls[0][1]["timeout"] <= 3

    def missing(self, name, **kwargs):
        import httpx2

        reply = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co"))
        raise RepositoryNotFoundError("404", response=reply)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", missing)
    with pytest.raises(ConfigError, match="the hub has no model 'org/nothing'"):
        check_source("org/nothing", "policy")
    (tmp_path / "hub" / "models--org--cached").mkdir(parents=True)
    assert check_source("org/cached", "policy") == "org/cached"  # no request for cached names
