"""Text task sequences: JSONL task folders tokenized once into tensors, and the tiny offline fixtures the other
pretrained-model tests use (a BERT-style model with a WordPiece tokenizer trained here, saved like a hub folder)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from src.continual.validate import ConfigError
from src.data.download import DatasetError

WORDS = [["apple", "banana", "cherry", "grape"], ["red", "green", "blue", "black"], ["cat", "dog", "cow", "hen"],
         ["one", "two", "three", "four"], ["sun", "moon", "star", "sky"], ["car", "bus", "train", "boat"]]


def make_task_folders(root: Path, n_tasks: int = 3, n_train: int = 40, n_test: int = 12, seed: int = 0) -> Path:
    """Task t: two classes, each text a few filler words and one keyword of its class (learnable, separable)."""
    rng = random.Random(seed)
    filler = ["the", "a", "is", "of", "and", "to", "in", "it"]
    for t in range(n_tasks):
        folder = root / f"task{t}"
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            with open(folder / f"{split}.jsonl", "w") as f:
                for i in range(n):
                    label = i % 2
                    words = rng.choices(filler, k=5) + [rng.choice(WORDS[(2 * t + label) % len(WORDS)])]
                    rng.shuffle(words)
                    f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return root


def make_tiny_bert(folder: Path, hidden: int = 16, layers: int = 2, heads: int = 2) -> Path:
    """A random BERT (config + safetensors weights) and a WordPiece tokenizer trained on the fixture words, saved as
    a Hugging Face model folder (what `model.name=<folder>` loads)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(w) for w in WORDS] + ["the a is of and to in it"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                      ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def text_tasks(tmp_path_factory) -> Path:
    return make_task_folders(tmp_path_factory.mktemp("text_tasks"))


def test_text_files_tokenized_once_into_tensors(tiny_bert, text_tasks):
    from src.data.text import TaskPerSourceTask, TextFiles, TextTaskSequenceDataModule

    source = TextFiles(str(text_tasks), str(tiny_bert), max_length=12)
    dm = TextTaskSequenceDataModule(source, TaskPerSourceTask(3), batch_size=8, eval_batch_size=16, val_fraction=0.25)
    dm.setup()
    data = dm.data
    assert data.train_x.dtype == torch.int32 and data.train_x.shape == (120, 2, 12)
    assert data.n_classes == 6 and dm.classes_per_task == 2 and dm.input_shape == (2, 12)
    # labels are task * 2 + local; the first text of task1 is its first JSONL line
    first = json.loads((text_tasks / "task1" / "train.jsonl").read_text().splitlines()[0])
    assert data.train_y[40] == 2 + first["label"]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_bert))(first["text"], padding="max_length", max_length=12,
                                                        truncation=True)
    assert data.train_x[40, 0].tolist() == ids["input_ids"] and data.train_x[40, 1].tolist() == ids["attention_mask"]
    # tasks are the folders; validation is carved from train; local labels are 0/1
    for t, task in enumerate(dm.task_list):
        assert task.classes == [2 * t, 2 * t + 1]
        assert len(task.train_index) == 30 and len(task.val_index) == 10 and len(task.test_index) == 12
        assert set(task.train_label.tolist()) == {0, 1}
    x, y, task_ids = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 2, 12) and x.dtype == torch.int32
    assert dm.on_after_batch_transfer((x, y, task_ids), 0)[0] is x  # served as is: no normalisation


def test_string_labels_and_fewer_tasks(tiny_bert, tmp_path):
    from src.data.text import TaskPerSourceTask, TextFiles, TextTaskSequenceDataModule

    for name, labels in (("a", ["pos", "neg", "mid"]), ("b", ["x", "y"])):
        (tmp_path / name).mkdir()
        for split in ("train", "test"):
            lines = [json.dumps({"text": f"apple {label}", "label": label}) for label in labels * 4]
            (tmp_path / name / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    dm = TextTaskSequenceDataModule(TextFiles(str(tmp_path), str(tiny_bert), 8), TaskPerSourceTask(1), val_fraction=0)
    dm.setup()
    assert dm.classes_per_task == 3 and dm.data.n_classes == 6  # the largest task sets the classes per task
    assert dm.data.class_names[:3] == ("a:mid", "a:neg", "a:pos")
    assert len(dm.task_list) == 1 and dm.task_list[0].classes == [0, 1, 2]


def test_missing_folder_and_files_are_one_line_errors(tmp_path):
    from src.data.text import TextFiles

    with pytest.raises(ConfigError, match=r"dataset.source.root=.* is invalid: a folder with one sub-folder per task"):
        TextFiles(str(tmp_path / "nowhere"), "tok")
    (tmp_path / "t0").mkdir()
    (tmp_path / "t0" / "train.jsonl").write_text("")
    with pytest.raises(ConfigError, match="t0/ has no test.jsonl"):
        TextFiles(str(tmp_path), "tok")


def test_task_folders_resolver_counts_the_folders(tmp_path):
    from omegaconf import OmegaConf

    import src.data.source  # noqa: F401  (registers the resolver)

    make_task_folders(tmp_path, n_tasks=4, n_train=2, n_test=2)
    cfg = OmegaConf.create({"root": str(tmp_path), "n": "${task_folders:${root}}"})
    assert cfg.n == 4


def test_text_cl5_offline_and_not_cached_is_one_line(tmp_path, monkeypatch):
    from src.data.download import DatasetError
    from src.data.text import TextCL5

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="dataset.source.order=7 is invalid"):
        TextCL5("tok", order=7)
    source = TextCL5("tok", order=[ "ag", "yelp"])
    with pytest.raises(DatasetError, match=r"^dataset=text_cl5: ag \(fancyzhx/ag_news, split train\) is not in the "
                                           r"datasets cache and cannot be downloaded"):
        source.load()


def test_text_cl5_reads_only_the_cache_when_the_hub_cannot_be_reached(monkeypatch):
    """No network: datasets is asked in its offline mode (its cache, at once) instead of retrying the hub ≈ 20 s, and
    the error names why; with a network it is asked normally. Its offline switch is restored either way."""
    import datasets
    import datasets.config

    from src.data import text

    seen = []

    def fake_load(hub_id, split):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        raise ConnectionError("not cached")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(text, "offline_reason", lambda: "https://huggingface.co does not resolve")
    source = text.TextCL5("tok", order=["ag", "yelp"])
    with pytest.raises(DatasetError, match=r"cannot be downloaded \(https://huggingface.co does not resolve\)"):
        source.load()
    monkeypatch.setattr(text, "offline_reason", lambda: None)
    with pytest.raises(DatasetError, match=r"cannot be downloaded \(ConnectionError\)"):
        source.load()
    assert seen == [True, False] and datasets.config.HF_HUB_OFFLINE is False


def test_text_cl5_sampling_is_uniform_seeded_and_order_free(tiny_bert, monkeypatch, tmp_path):
    """A local stand-in for the `datasets` splits: the sampling and the assembly as they run on the real ones. Test
    samples are drawn uniformly, as the public MbPA++ re-implementations do (`DataFrame.sample(n=7600)`), not per
    class; a dataset's draws do not depend on its place in the order."""
    from src.data.text import TextCL5

    def fake_split(self, name, split):
        n = 60 if split == "train" else 40
        classes = {"ag": 4, "yelp": 5}[name]
        labels = [0] * (n // 2) + [i % classes for i in range(n // 2)]  # class 0 over-represented
        return [f"apple {name} {i}" for i in range(n)], labels

    monkeypatch.setattr(TextCL5, "_split", fake_split)
    source = TextCL5(str(tiny_bert), max_length=8, order=["ag", "yelp"], train_per_task=30, test_per_task=20,
                     cache_dir=str(tmp_path))
    data = source.load()
    assert data.classes_per_task == 5 and data.n_classes == 10 and data.task_names == ("ag", "yelp")
    assert len(data.train_y) == 60 and len(data.test_y) == 20 + 20
    assert torch.bincount(data.test_y[:20], minlength=4)[0] > 20 // 4  # not a per-class draw: class 0 stays common
    assert set(data.test_y[20:].tolist()) <= {5, 6, 7, 8, 9}  # yelp's labels after ag's 5 outputs
    again = TextCL5(str(tiny_bert), max_length=8, order=["ag", "yelp"], train_per_task=30, test_per_task=20,
                    cache_dir=str(tmp_path)).load()  # from the cache file
    assert torch.equal(again.train_x, data.train_x) and len(list(tmp_path.glob("text_cl5-*.pt"))) == 1
    swapped = TextCL5(str(tiny_bert), max_length=8, order=["yelp", "ag"], train_per_task=30, test_per_task=20).load()
    assert torch.equal(swapped.test_x[20:], data.test_x[:20]) and torch.equal(swapped.train_x[30:], data.train_x[:30])


def test_text_cl5_joins_title_and_body_columns(monkeypatch):
    """Amazon's mirror keeps the title apart (review_title, review_text): both are read, as the re-implementations
    join title and body; its 1-5 stars become 0-4."""
    import datasets

    from src.data.text import TextCL5

    class Split(dict):
        column_names = property(lambda self: list(self))

    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: Split(
        class_index=[1, 5], review_title=["Great", "Bad"], review_text=["works well", "broke"]))
    texts, labels = TextCL5("tok", order=["amazon"])._split("amazon", "train")
    assert texts == ["Great works well", "Bad broke"] and labels == [0, 4]
