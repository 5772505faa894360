"""Shared fixtures: tiny models built inline from a config, with a tokenizer trained on the spot.

Nothing here touches a network: the tokenizer is a byte-level BPE trained on a few sentences,
and the models are random Llama configs small enough to run in milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import ray
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from carryon_ray.bases import FrozenBase
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.records import LayerRef, Layout

# One precision for the suite on every machine (Ray workers inherit it): `dtype: auto` would
# pick bfloat16 on CPUs where it measures faster, and the tolerances here are float32's.
os.environ.setdefault("CARRYON_AUTO_DTYPE", "float32")

CORPUS = [
    "Question: Natalia sold 48 clips in April and half as many in May. How many in all?",
    "Answer: She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 clips. #### 72",
    "The quick brown fox jumps over the lazy dog. Python lists are mutable sequences.",
    "def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9 = + - * / < > ####",
]


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def save_endless_model(directory: Path, tokenizer, *, hidden_size: int, layers: int) -> Path:
    """Save a tiny base that never ends a greedy answer early (its EOS embedding row is zero,
    so that logit is 0 while the largest of the others is positive) and holds 1,100 tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1100,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.eos_token_id] = 0.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def mixture_carryon(primary: FrozenBase, other: FrozenBase, *, seed: int = 5) -> tuple[CarryOn, Layout]:
    """A small carry-on reading the last layer of two bases (a mixture of LLMs), with a random,
    non-zero Δ so the merged model differs from the primary."""
    refs = [LayerRef(base.name, base.num_layers, base.hidden_size) for base in (primary, other)]
    layout = Layout.build(codec="absmax", residual=(refs[0], 8), sources=[(refs[0], 4), (refs[1], 4)],
                          bases=[primary.identity(), other.identity()])
    torch.manual_seed(seed)
    carry_on = CarryOn(CarryOnConfig(input_dims=[primary.hidden_size, other.hidden_size],
                                     output_dim=primary.hidden_size, hidden_size=32, num_layers=1,
                                     num_heads=2, max_positions=256))
    torch.nn.init.normal_(carry_on.delta.weight, std=1.0)
    return carry_on, layout


def make_model(vocab_size: int, *, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny HF model directory usable as `bases[].path`."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = make_model(len(tiny_tokenizer))
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


# A minimal chat template for the tiny tokenizer (serving and hostile-input tests).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model, its tokenizer given `CHAT_TEMPLATE`."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model_dir, directory, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory) -> Path:
    """Prompt/answer rows in the GSM8K field names."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [
        {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}. #### {2 * i}"}
        for i in range(24)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def other_tokenizer() -> PreTrainedTokenizerFast:
    """A second tokenizer that splits the same text differently (more merges)."""
    return make_tokenizer(vocab_size=400)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, other_tokenizer) -> Path:
    """A second tiny base (other tokenizer, other width) for mixture-of-LLMs tests."""
    directory = tmp_path_factory.mktemp("tiny-other")
    model = make_model(len(other_tokenizer), seed=1, hidden_size=48)
    model.save_pretrained(directory)
    other_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture()
def tiny_base(tiny_tokenizer) -> FrozenBase:
    return FrozenBase.from_model("tiny", make_model(len(tiny_tokenizer)), tiny_tokenizer)


@pytest.fixture()
def lively_base(tiny_tokenizer) -> FrozenBase:
    """A tiny base with larger weights, so greedy decoding does not repeat one token forever."""
    model = make_model(len(tiny_tokenizer))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return FrozenBase.from_model("lively", model, tiny_tokenizer)


@pytest.fixture(scope="module")
def local_ray():
    """One local cluster per Ray test module, carrying both roles; never joins another one."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        resources={"inference": 100, "training": 100},
        include_dashboard=False,
    )
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto's standalone server) on 127.0.0.1, in its own
    process, with the environment pyarrow's S3FileSystem reads pointed at it. Yields its URL;
    each test makes its own bucket."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError("the moto S3 server did not start")
            time.sleep(0.2)
    saved = {key: os.environ.get(key) for key in S3_ENV}
    os.environ.update({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(timeout=30)


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the S3 server; yields `s3://NAME`."""
    import uuid

    import pyarrow.fs as pafs

    name = f"carryon-{uuid.uuid4().hex[:10]}"
    pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", region="us-east-1",
                     allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"
