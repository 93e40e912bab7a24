"""Chat templates: the built-ins render what they promise, apply_chat_template fits
tokenizer and model to the run's template (added tokens trained and saved), a base
model with no template trains and evaluates with the default, and the template
travels with every artefact (adapter, merged model, GGUF, Modelfile)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.models.conftest import probe_logits

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4."},
]
BUILTINS = ("alpaca", "chatml", "gemma", "llama3", "mistral")


class _Cfg:
    """The two attributes apply_chat_template reads from a Config."""

    def __init__(self, chat_template, base_dir="."):
        self.chat_template, self.base_dir = chat_template, Path(base_dir)


@pytest.fixture
def smol(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    def _tok(template=True):
        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
        if not template:
            tok.chat_template = None
        return tok

    return _tok


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_tokenizer_dir):
    from tunesmith.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tpl") / "m", hidden=32, layers=1, tok_dir=tiny_tokenizer_dir)


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_builtins_are_plugins_with_declared_members():
    import tunesmith
    from tunesmith.core.registry import member

    regs = tunesmith.registry()
    assert set(BUILTINS) <= set(regs.chat_templates.names())
    for name in BUILTINS:
        obj = regs.chat_templates.get(name)
        assert isinstance(obj.template, str) and obj.description
        go = member(obj, "chat_templates", "ollama_template")
        # the Go template is balanced: every if/range has its end
        opens = len(re.findall(r"\{\{-?\s*(?:if|range)\b", go))
        ends = len(re.findall(r"\{\{-?\s*end\s*-?\}\}", go))
        assert opens == ends, name
        assert "[" not in obj.description  # `tunesmith plugins` prints descriptions as rich markup


def test_plugins_table_lists_the_templates(capsys):
    from tunesmith.cli import main

    _cli(main, ["plugins"])
    out = capsys.readouterr().out
    assert all(name in out for name in BUILTINS) and "gguf-lora" in out


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_renders_and_labels_only_the_answers(name, smol, tiny_model):
    from tunesmith.core.render import IGNORE_INDEX, render_chat, render_prompt
    from tunesmith.core.templates import apply_chat_template

    tok = smol()
    model = _model(tiny_model)
    rec = apply_chat_template(_Cfg(name), tok, model, quiet=True)
    assert rec["name"] == name and rec["source"] == "config"
    eot = rec["end_of_turn"]
    assert eot in tok.get_vocab() and tok.eos_token == eot
    out = render_chat(tok, CONV)
    text = tok.decode(out["input_ids"])
    assert "Be brief." in text and "Hi there" in text and "2+2?" in text
    labelled = tok.decode([i for i, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX])
    assert labelled == f"Hello!{eot}4.{eot}"  # the answers and each end-of-turn, nothing else
    prompt = render_prompt(tok, CONV[:2])
    assert text.startswith(prompt) and "Hello!" not in prompt
    # pad is never EOS where the vocabulary has a spare token (SmolLM2 has <|endoftext|>)
    assert tok.pad_token != tok.eos_token
    assert model.get_input_embeddings().num_embeddings == len(tok)


def test_missing_tokens_are_added_trained_and_loadable_by_plain_peft(smol, tiny_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from tunesmith.core.templates import apply_chat_template

    tok = smol()
    model = _model(tiny_model)
    rec = apply_chat_template(_Cfg("llama3"), tok, model, quiet=True)
    assert rec["added_tokens"] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert rec["resized_embeddings"] == [49152, 49155]
    new_ids = [tok.convert_tokens_to_ids(t) for t in rec["added_tokens"]]
    assert rec["trainable_token_indices"] == {"embed_tokens": new_ids}  # tied head follows the embedding
    assert tok("<|eot_id|>", add_special_tokens=False)["input_ids"] == [new_ids[2]]  # never split
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"],
                                                  trainable_token_indices=rec["trainable_token_indices"]))
    ids = torch.tensor([new_ids + [10, 20]])
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    peft_model.eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    # elsewhere: the plain base, resized to the adapter's tokenizer, then plain peft
    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    base = _model(tiny_model)
    base.resize_token_embeddings(len(tok2))
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)
    assert tok2.chat_template == tok.chat_template


def test_template_from_a_jinja_file_and_its_tokens(smol, tiny_model, tmp_path):
    from tunesmith.core.errors import ConfigError
    from tunesmith.core.templates import apply_chat_template

    (tmp_path / "vicuna.jinja").write_text(
        "{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ '<|end|>' }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}",
        encoding="utf-8")
    tok = smol()
    rec = apply_chat_template(_Cfg("vicuna.jinja", tmp_path), tok, _model(tiny_model), quiet=True)
    assert rec["source"] == "file" and rec["path"] == str((tmp_path / "vicuna.jinja").resolve())
    assert rec["added_tokens"] == ["<|end|>"] and rec["end_of_turn"] == "<|end|>"
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a usable chat template"):
        apply_chat_template(_Cfg("broken.jinja", tmp_path), smol(), _model(tiny_model), quiet=True)
    with pytest.raises(Exception, match="did you mean 'chatml'"):
        apply_chat_template(_Cfg("chatmll"), smol(), _model(tiny_model), quiet=True)


def test_no_template_no_key_gets_the_default_and_says_so(smol, tiny_model, capsys):
    from tunesmith.core.models import setup_tokenizer
    from tunesmith.core.templates import DEFAULT_TEMPLATE, apply_chat_template

    tok = setup_tokenizer(smol(template=False))  # what load_from_dir does to a base model's tokenizer
    assert DEFAULT_TEMPLATE == "alpaca" and "### Instruction:" in tok.chat_template
    rec = apply_chat_template(_Cfg(None), tok, _model(tiny_model))
    assert rec["source"] == "default" and rec["name"] == "alpaca" and not rec["added_tokens"]
    said = [line for line in capsys.readouterr().out.splitlines() if "chat template" in line]
    assert len(said) == 1 and "'alpaca'" in said[0] and "set chat_template:" in said[0]
    # the tokenizer's own template is kept and recognised
    own = smol()
    rec = apply_chat_template(_Cfg(None), own, _model(tiny_model), quiet=True)
    assert rec["source"] == "tokenizer" and rec["name"] == "chatml"
    assert rec["default_system"].startswith("You are a helpful AI assistant named SmolLM")


def test_pad_distinct_from_eos_or_labels_still_right(smol):
    from tunesmith.core.models import setup_tokenizer
    from tunesmith.core.render import IGNORE_INDEX, TokenCollator, render_chat

    tok = setup_tokenizer(smol())
    assert tok.pad_token == "<|endoftext|>" != tok.eos_token == "<|im_end|>"
    # a vocabulary without a spare token: pad falls back to EOS, and the EOS labels survive collation
    tok2 = smol()
    tok2.pad_token = tok2.eos_token
    vocab = tok2.get_vocab()
    from tunesmith.core import templates

    cands = templates._PAD_CANDIDATES
    try:
        templates._PAD_CANDIDATES = tuple(c for c in cands if c not in vocab)
        setup_tokenizer(tok2)
    finally:
        templates._PAD_CANDIDATES = cands
    assert tok2.pad_token == tok2.eos_token
    a = render_chat(tok2, CONV[1:3])
    b = render_chat(tok2, CONV[1:])
    batch = TokenCollator(tok2.pad_token_id)([a, b])
    eos = tok2.eos_token_id
    row = batch["labels"][0].tolist()
    assert row.count(eos) == 1  # the answer's EOS is a label; the padding after it is not
    assert all(x == IGNORE_INDEX for x in row[len(a["input_ids"]):])


def test_modelfile_for_builtins_and_detected_templates(smol, tiny_model):
    from tunesmith.core.templates import apply_chat_template
    from tunesmith.plugins.exporters.modelfile import modelfile_text

    text = modelfile_text(smol(), model="model-q8_0.gguf")  # SmolLM2's own: ChatML with a default system prompt
    assert text.startswith("FROM ./model-q8_0.gguf\nTEMPLATE \"\"\"")
    assert "<|im_start|>assistant" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    for name, stop in (("llama3", "<|eot_id|>"), ("gemma", "<end_of_turn>"), ("alpaca", "### Instruction:")):
        tok = smol()
        apply_chat_template(_Cfg(name), tok, _model(tiny_model), quiet=True)
        text = modelfile_text(tok, model="m.gguf", adapter="adapter.gguf")
        assert "ADAPTER ./adapter.gguf" in text and f"PARAMETER stop {json.dumps(stop)}" in text
        assert ("SYSTEM" in text) == (name == "alpaca")
    tok = smol()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert "TEMPLATE" not in modelfile_text(tok, model="m.gguf")  # Ollama reads the GGUF's own


def test_added_tokens_end_to_end_train_reload_merge_gguf(tiny_model, tmp_path, keep_logits, tiny_chat_file):
    """A template the vocabulary lacks (llama3 on SmolLM2's tokenizer): the new rows
    train, the adapter reloads with the trained logits, merged and GGUF exports carry
    the grown vocabulary and the template."""
    import tunesmith
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.core.export import export_run
    from tunesmith.core.models import load_trained
    from tunesmith.core.session import train

    cfg = {"model": {"source": "hf", "path": str(tiny_model)}, "chat_template": "llama3",
           "data": {"path": str(tiny_chat_file)},
           "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
           "training": {"max_steps": 3, "learning_rate": 2e-2, "batch_size": 4, "max_length": 64, "save_steps": 0,
                        "eval_steps": 0, "warmup_ratio": 0.0, "report_to": [], "early_stopping": None,
                        "gradient_checkpointing": False, "precision": "fp32"},
           "evaluation": [], "output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    tunesmith.reset_plugins()
    result = train(tunesmith.load_config(tmp_path / "c.yaml"))
    final = Path(result["output_path"])
    info = json.loads((final / "tunesmith.json").read_text())
    assert info["template"]["name"] == "llama3" and len(info["template"]["added_tokens"]) == 3
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["trainable_token_indices"] == {"embed_tokens": [49152, 49153, 49154]}
    # only the trained token rows are saved, not the resized embedding matrix (peft's
    # save_embedding_layers="auto" would save all 49155 rows here)
    from safetensors import safe_open

    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert not [k for k, v in shapes.items() if 49155 in v], shapes
    rows = {k: v for k, v in shapes.items() if "trainable_tokens" in k}
    assert list(rows.values()) == [(3, 32)], rows
    model, tok, _ = load_trained(result["run_dir"])
    assert len(tok) == 49155 and "<|eot_id|>" in tok.chat_template
    assert torch.allclose(probe_logits(model, tok), keep_logits.logits, atol=1e-5)
    # elsewhere, nothing from tunesmith: the base resized to the adapter's tokenizer, plain peft
    from peft import PeftModel

    tok2 = AutoTokenizer.from_pretrained(final)
    plain = _model(tiny_model)
    plain.resize_token_embeddings(len(tok2))
    plain = PeftModel.from_pretrained(plain, final).eval()
    ids = tok2.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                   return_dict=True, return_tensors="pt")["input_ids"]
    assert {49152, 49153} <= set(ids[0].tolist())  # the probe goes through the added rows
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
        assert torch.allclose(probe_logits(plain, tok2), keep_logits.logits, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(export_run(result["run_dir"], "merged", tmp_path / "merged"))
    assert merged.config.vocab_size == 49155
    assert torch.allclose(probe_logits(merged.float(), tok), keep_logits.logits, atol=1e-4)
    path = export_run(result["run_dir"], "gguf", tmp_path / "gguf", options={"type": "f16"})
    gtok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert gtok.chat_template == tok.chat_template and gtok.convert_tokens_to_ids("<|eot_id|>") == 49154
    assert 'PARAMETER stop "<|eot_id|>"' in path.with_suffix(".Modelfile").read_text()


def test_the_runs_template_travels_with_every_artefact(tiny_model, tmp_path, tiny_chat_file):
    """A template other than the tokenizer's own (gemma, over SmolLM2's ChatML) is
    recorded in the run and is the one in the adapter folder, the adapter export, the
    merged model, the GGUF metadata and the Modelfile's TEMPLATE."""
    import gguf
    import tunesmith
    from transformers import AutoTokenizer

    from tunesmith.core.export import export_run
    from tunesmith.core.registry import member
    from tunesmith.core.session import train
    from tunesmith.plugins.chat_templates.gemma import TEMPLATE

    cfg = {"model": {"source": "hf", "path": str(tiny_model)}, "chat_template": "gemma",
           "data": {"path": str(tiny_chat_file)},
           "peft": {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj"], "dropout": 0.0},
           "training": {"max_steps": 1, "batch_size": 2, "max_length": 48, "save_steps": 0, "eval_steps": 0,
                        "report_to": [], "early_stopping": None, "gradient_checkpointing": False, "precision": "fp32"},
           "evaluation": [], "output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    tunesmith.reset_plugins()
    run = train(tunesmith.load_config(tmp_path / "c.yaml"))["run_dir"]
    final = Path(run) / "final"
    rec = json.loads((final / "tunesmith.json").read_text())["template"]
    import hashlib

    assert rec["name"] == "gemma" and rec["source"] == "config" and rec["end_of_turn"] == "<end_of_turn>"
    assert rec["sha256"] == hashlib.sha256(TEMPLATE.encode()).hexdigest()
    assert (final / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE
    adapter = export_run(run, "adapter", tmp_path / "adapter")
    assert AutoTokenizer.from_pretrained(adapter).chat_template == TEMPLATE
    merged = export_run(run, "merged", tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(merged).chat_template == TEMPLATE
    assert json.loads((Path(merged) / "tokenizer_config.json").read_text()).get("chat_template", TEMPLATE) == TEMPLATE
    path = export_run(run, "gguf", tmp_path / "gguf", options={"type": "q8_0"})
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.chat_template"].contents() == TEMPLATE
    eot = tunesmith.registry().chat_templates.get("gemma")
    go = member(eot, "chat_templates", "ollama_template").replace("[[eos_token]]", "<end_of_turn>")
    modelfile = path.with_suffix(".Modelfile").read_text()
    assert f'TEMPLATE """{go}"""' in modelfile and 'PARAMETER stop "<end_of_turn>"' in modelfile
    assert "<|im_start|>" not in modelfile  # not the tokenizer's own ChatML


def test_eval_renders_prompts_with_the_runs_template(tiny_model, tmp_path, tiny_chat_file, monkeypatch):
    """`tunesmith eval` of a run trained with gemma (the tokenizer's own is ChatML)
    prompts the tuned model and its base (adapters disabled) with gemma, exactly as
    training rendered those rows."""
    import tunesmith
    from tunesmith.cli import main
    from tunesmith.core import evalset, render

    base = {"model": {"source": "hf", "path": str(tiny_model)}, "chat_template": "gemma",
            "data": {"path": str(tiny_chat_file)},
            "peft": {"method": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj"], "dropout": 0.0},
            "training": {"max_steps": 1, "batch_size": 2, "max_length": 256, "save_steps": 0, "eval_steps": 0,
                         "report_to": [], "early_stopping": None, "gradient_checkpointing": False,
                         "precision": "fp32"},
            "evaluation": [], "output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    trained = _spy_training_prompts(monkeypatch, render)
    tunesmith.reset_plugins()
    _cli(main, ["train", str(tmp_path / "c.yaml")])
    # gemma's form (after the tokenizer's BOS), not the tokenizer's own ChatML turns
    assert trained and all(p.endswith("<end_of_turn>\n<start_of_turn>model\n") and "<|im_end|>" not in p
                           for p in trained.values())
    base["evaluation"] = [{"name": "generation", "path": str(tiny_chat_file), "limit": 2, "max_new_tokens": 1}]
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    prompts = _spy_eval_prompts(monkeypatch, evalset)
    _cli(main, ["eval", str(tmp_path / "e.yaml")])
    assert len(prompts) == 4  # two rows, tuned and base
    for user, prompt in prompts:
        assert prompt == trained[user], (prompt, trained[user])


def _spy_training_prompts(monkeypatch, render) -> dict:
    """{first user message: the prompt text training rendered} (everything before the first label)."""
    seen: dict = {}
    original = render.render_chat

    def spy(tokenizer, messages, **kw):
        out = original(tokenizer, messages, **kw)
        first = next(i for i, lab in enumerate(out["labels"]) if lab != render.IGNORE_INDEX)
        user = next(m["content"] for m in messages if m["role"] == "user")
        seen.setdefault(user, tokenizer.decode(out["input_ids"][:first]))
        return out

    monkeypatch.setattr(render, "render_chat", spy)
    return seen


def _spy_eval_prompts(monkeypatch, evalset) -> list:
    """[(first user message, prompt)] as the evaluators render them."""
    seen: list = []
    original = evalset.render_prompt

    def spy(tokenizer, messages, **kw):
        text = original(tokenizer, messages, **kw)
        seen.append((next(m["content"] for m in messages if m["role"] == "user"), text))
        return text

    monkeypatch.setattr(evalset, "render_prompt", spy)
    return seen


def _cli(main, args):
    try:
        main(args)
    except SystemExit as exc:  # main exits only on failure
        assert exc.code in (0, None), f"tunesmith {' '.join(args)} exited {exc.code}"


def test_cli_base_model_without_template_trains_and_evaluates_with_it(tmp_path, monkeypatch, capsys, tiny_tokenizer_dir):
    """`tunesmith train` on a base model whose tokenizer ships no chat template, on the
    quickstart data: it trains with the default (alpaca), saves it with the adapter,
    and `tunesmith eval` renders the tuned and the base model's prompts with it."""
    from tests.models.archs import build
    from tunesmith.cli import main
    from tunesmith.core import evalset
    from tunesmith.plugins.chat_templates.alpaca import TEMPLATE

    base = build("qwen2", tmp_path / "base", tok_dir=tiny_tokenizer_dir, chat_template=False)
    assert not (base / "chat_template.jinja").exists()
    quick = Path(__file__).resolve().parents[2] / "examples" / "data" / "quickstart.jsonl"
    cfg = {"model": {"source": "hf", "path": str(base)}, "data": {"path": str(quick)},
           "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
           "training": {"max_steps": 2, "batch_size": 2, "max_length": 256, "save_steps": 0, "eval_steps": 0,
                        "report_to": [], "early_stopping": None, "gradient_checkpointing": False, "precision": "fp32"},
           "evaluation": [{"name": "generation", "path": str(quick), "limit": 2, "max_new_tokens": 2}],
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    from tunesmith.core import render

    trained = _spy_training_prompts(monkeypatch, render)
    _cli(main, ["train", str(tmp_path / "c.yaml")])
    out = capsys.readouterr().out
    assert sum("chat template:" in line for line in out.splitlines()) == 1 and "'alpaca'" in out
    assert "Failed to load CPU gemm" not in out
    final = tmp_path / "run" / "final"
    assert (final / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE
    info = json.loads((final / "tunesmith.json").read_text())
    assert info["template"]["source"] == "default" and info["template"]["name"] == "alpaca"
    assert (tmp_path / "run" / "logs" / "tunesmith.log").exists()

    prompts = _spy_eval_prompts(monkeypatch, evalset)
    _cli(main, ["eval", str(tmp_path / "c.yaml")])
    assert len(prompts) == 4  # two rows, tuned and base
    assert all(p.startswith("Below is an instruction") and p.endswith("### Response:\n") for _, p in prompts)
    # exactly the prompt text training rendered for those rows (everything before the first label)
    for user, prompt in prompts:
        assert prompt == trained[user], (prompt, trained[user])
