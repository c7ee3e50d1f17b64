"""Text task sequences: sources that tokenize once per dataset and keep token ids, attention masks and labels as
tensors, and the DataModule that serves them (docs/pretrained.md).

The data are tensors as for images: a split is an int32 tensor N × 2 × L (row 0 the token ids, row 1 the attention
mask, L = `dataset.max_length`), cut into batches by the same index loader, so no Python runs per sample in a step.
The model (`model=hf`) takes the B × 2 × L batch as its input. Labels are global: task t's local label c is
`t * classes_per_task + c`, with classes_per_task the largest number of classes of any task (a task with fewer
classes leaves its last outputs unused), so `ClassSplit` in natural order gives back exactly the source's tasks and
task-, class- and domain-incremental scenarios work unchanged (domain-IL: tasks that share their label meanings).

- `TextFiles` (`dataset=text_files`): a folder with one sub-folder per task, in sorted name order, each holding
  `train.jsonl` and `test.jsonl`, one `{"text": ..., "label": ...}` per line; labels are local to the task (integers
  0…c−1, or strings, numbered in sorted order). The validation split is carved out of train.jsonl as for images.
- `TextCL5` (`dataset=text_cl5`): de Masson d'Autume et al.'s 5-dataset benchmark, see its docstring.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from src.continual.validate import ConfigError
from src.data.datamodule import TaskSequenceDataModule
from src.data.download import DatasetError
from src.data.tasks import ClassSplit
from src.models.hub import cache_first, offline_reason

log = logging.getLogger(__name__)


@dataclass
class TextData:
    """Tokenized splits: `train_x`/`test_x` int32 N × 2 × L (ids, mask); labels int64 global class ids."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int
    classes_per_task: int
    task_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int]:
        return tuple(self.train_x.shape[1:])


def tokenize(tokenizer_name: str, texts: list[str], max_length: int) -> torch.Tensor:
    """N × 2 × max_length int32: token ids and attention mask, padded and truncated to `max_length`, in one call."""
    tokenizer = load_tokenizer(tokenizer_name)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).to(torch.int32)


def _load_dataset(hub_id: str, split: str, cache_only: bool):
    """`datasets.load_dataset`; `cache_only` (the hub cannot be reached: src/models/hub.py) in datasets' offline mode,
    which reads its cache at once instead of retrying the hub for ≈ 20 s."""
    import datasets.config
    from datasets import load_dataset

    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or cache_only
    try:
        return load_dataset(hub_id, split=split)
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return cache_first(lambda **where: AutoTokenizer.from_pretrained(name, **where))
    except OSError:
        raise ConfigError(f"dataset.source.tokenizer={name!r}: not a local folder and not in the Hugging Face cache "
                          "(offline?); run once online or point model.name at a folder with the tokenizer files") from None


def assemble(tasks: list[tuple[str, list, list, list, list]], tokenizer: str, max_length: int) -> TextData:
    """(name, train texts, train local labels, test texts, test local labels) per task → TextData, tokenized once."""
    names_per_task = []
    for name, _, train_labels, _, test_labels in tasks:
        values = set(train_labels) | set(test_labels)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            if min(values, default=0) < 0:
                raise DatasetError(f"task {name}: labels must be integers >= 0 (or strings)")
            names_per_task.append([str(v) for v in range(max(values, default=-1) + 1)])
        else:
            names_per_task.append(sorted(str(v) for v in values))
    per_task = max(len(n) for n in names_per_task)
    texts = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    for t, ((_, train_texts, train_labels, test_texts, test_labels), names) in enumerate(zip(tasks, names_per_task, strict=True)):
        number = {v: i for i, v in enumerate(names)}
        for split, xs, ys in (("train", train_texts, train_labels), ("test", test_texts, test_labels)):
            texts[split] += xs
            labels[split] += [t * per_task + (y if isinstance(y, int) and not isinstance(y, bool) else number[str(y)])
                              for y in ys]
    train_x = tokenize(tokenizer, texts["train"], max_length)
    test_x = tokenize(tokenizer, texts["test"], max_length)
    class_names = tuple(f"{tasks[t][0]}:{names_per_task[t][c]}" if c < len(names_per_task[t]) else f"{tasks[t][0]}:-"
                        for t in range(len(tasks)) for c in range(per_task))
    return TextData(train_x, torch.tensor(labels["train"]), test_x, torch.tensor(labels["test"]),
                    n_classes=per_task * len(tasks), classes_per_task=per_task,
                    task_names=tuple(t[0] for t in tasks), class_names=class_names)


def task_folders(root) -> list[Path]:
    root = Path(str(root)).expanduser()
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def read_jsonl(path: Path) -> tuple[list[str], list]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(str(record["text"]))
                labels.append(record["label"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DatasetError(f"{path}:{number}: expected one JSON object with \"text\" and \"label\"") from None
    return texts, labels


class TextFiles:
    """One sub-folder per task (sorted by name) with train.jsonl and test.jsonl."""

    n_classes = None  # known only after reading the files

    def __init__(self, root: str, tokenizer: str, max_length: int = 128):
        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"dataset.max_length={max_length!r} is invalid: an integer >= 2 (tokens per text)")
        self.root, self.tokenizer, self.max_length = Path(str(root)).expanduser(), str(tokenizer), max_length
        folders = task_folders(self.root)
        if not folders:
            raise ConfigError(f"dataset.source.root={str(root)!r} is invalid: a folder with one sub-folder per task "
                              "(each holding train.jsonl and test.jsonl)")
        for folder in folders:
            for split in ("train", "test"):
                if not (folder / f"{split}.jsonl").is_file():
                    raise ConfigError(f"dataset.source.root={str(root)!r} is invalid: {folder.name}/ has no {split}.jsonl")
        self.folders = folders
        self.input_shape = (2, max_length)  # known before loading, for the config checks

    def load(self) -> TextData:
        tasks = []
        for folder in self.folders:
            train = read_jsonl(folder / "train.jsonl")
            test = read_jsonl(folder / "test.jsonl")
            tasks.append((folder.name, *train, *test))
        return assemble(tasks, self.tokenizer, self.max_length)


class TaskPerSourceTask(ClassSplit):
    """The source's own tasks, in its order: `ClassSplit` in natural order with the source's classes per task
    (set by the DataModule once the data are loaded). `n_tasks` smaller than the source's keeps the first ones."""

    def __init__(self, n_tasks: int):
        super().__init__(n_tasks, classes_per_task=None)

    def build(self, train_y, test_y, n_classes, val_fraction, seed):
        if self.classes_per_task is None:
            raise RuntimeError("TaskPerSourceTask.classes_per_task is set by TextTaskSequenceDataModule.setup")
        return super().build(train_y, test_y, n_classes, val_fraction, seed)


class TextTaskSequenceDataModule(TaskSequenceDataModule):
    """The task-sequence DataModule for token tensors: batches go to the model as they are (no normalisation, no
    image augmentation); everything else (task order, validation split, DDP sharding, resumable order) is shared."""

    def __init__(self, source, tasks, max_length: int = 128, **kwargs):
        if kwargs.get("augment") is not None:
            raise ConfigError("dataset.augment is invalid for text: null")
        super().__init__(source, tasks, **kwargs)
        self.max_length = max_length

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self.source.load()
            self.tasks.classes_per_task = self.data.classes_per_task
            self.task_list = self.tasks.build(self.data.train_y, self.data.test_y, self.data.n_classes,
                                              self.val_fraction, self.seed)
        super().setup(stage)

    def _prepare(self, batch, global_step: int | None, layout=None, stream: int = 0, rows=None):
        return batch  # token ids as they are (no task transform is cached: `rows` is never recorded for text)


# ---- the 5-dataset text classification benchmark -------------------------------------------------------------------
# Hugging Face hub ids of Zhang, Zhao & LeCun's (2015) datasets as de Masson d'Autume et al. (2019) use them, and the
# columns holding the text and the label. Yahoo's text is question title + content + best answer (joined).
CL5_DATASETS = {
    "ag": ("fancyzhx/ag_news", ("text",), "label"),
    "yelp": ("Yelp/yelp_review_full", ("text",), "label"),
    "amazon": ("yassiracharki/Amazon_Reviews_for_Sentiment_Analysis_fine_grained_5_classes",
               ("review_title", "review_text"), "class_index"),
    "dbpedia": ("fancyzhx/dbpedia_14", ("title", "content"), "label"),
    "yahoo": ("community-datasets/yahoo_answers_topics", ("question_title", "question_content", "best_answer"),
              "topic"),
}
# The four task orders of de Masson d'Autume et al. (2019), Table/§4 (also LAMOL, Sun et al. 2020, and later work)
CL5_ORDERS = {
    1: ["yelp", "ag", "dbpedia", "amazon", "yahoo"],
    2: ["dbpedia", "yahoo", "ag", "amazon", "yelp"],
    3: ["yelp", "yahoo", "amazon", "dbpedia", "ag"],
    4: ["ag", "yelp", "amazon", "yahoo", "dbpedia"],
}


class TextCL5:
    """The 5-task text classification benchmark (AG News, Yelp, Amazon, DBpedia, Yahoo Answers) of de Masson
    d'Autume, Ruder, Kong & Yogatama, "Episodic Memory in Lifelong Language Learning" (NeurIPS 2019).

    Sampling (theirs, followed by LAMOL and most later work; docs/pretrained.md): `train_per_task` = 115,000 training
    and `test_per_task` = 7,600 test examples drawn uniformly at random from each dataset's splits (the sizes of AG
    News' training and test sets; as the public MbPA++ re-implementations draw them, `DataFrame.sample(n)`, not per
    class). Texts join the title and body columns, as those implementations do. Smaller values (e.g. O-LoRA's 1,000 per class, `train_per_class`) give the few-sample variant. Draws
    are seeded (`seed`), per dataset, so a task's samples do not depend on the order. Labels are each dataset's own
    (4, 5, 5, 14, 10 classes; Yelp and Amazon share their 1–5 star meaning, which matters for domain-IL only).

    Loaded with the `datasets` library (its cache, `HF_DATASETS_CACHE`, downloaded when online); offline and not
    cached, one line says which dataset was looked for. Tokenized once, with `tokenizer`; the tokenized tensors are
    cached in `cache_dir` (keyed by every setting), so a second run reads one file.
    """

    n_classes = None

    def __init__(self, tokenizer: str, max_length: int = 128, order: int | list[str] = 1, train_per_task: int | None = 115_000,
                 train_per_class: int | None = None, test_per_task: int = 7_600, seed: int = 0,
                 cache_dir: str | None = None):
        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"dataset.max_length={max_length!r} is invalid: an integer >= 2 (tokens per text)")
        names = CL5_ORDERS.get(order) if isinstance(order, int) else list(order)
        if not names or any(n not in CL5_DATASETS for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"dataset.source.order={order!r} is invalid: 1, 2, 3, 4 (de Masson d'Autume et al.'s "
                              f"orders) or a list of distinct names among {', '.join(CL5_DATASETS)}")
        self.names, self.tokenizer, self.max_length = names, str(tokenizer), max_length
        self.train_per_task, self.train_per_class, self.test_per_task = train_per_task, train_per_class, test_per_task
        self.seed, self.cache_dir = seed, cache_dir
        self.input_shape = (2, max_length)

    def _split(self, name: str, split: str):
        hub_id, text_columns, label_column = CL5_DATASETS[name]
        reason = offline_reason()
        try:
            data = _load_dataset(hub_id, split, cache_only=reason is not None)
        except Exception as err:  # offline and not cached, no such dataset, …
            raise DatasetError(f"dataset=text_cl5: {name} ({hub_id}, split {split}) is not in the datasets cache and "
                               f"cannot be downloaded ({reason or type(err).__name__}); run once online, or set "
                               "HF_DATASETS_CACHE to a cache that holds it") from None
        labels = [int(v) for v in data[label_column]]
        if name == "amazon" and min(labels) == 1:  # that copy numbers the stars 1…5
            labels = [v - 1 for v in labels]
        present = [c for c in text_columns if c in data.column_names]  # a mirror without a title column: the body
        if not present:
            raise DatasetError(f"dataset=text_cl5: {name} ({hub_id}) has none of the columns {', '.join(text_columns)}; "
                               f"it has {', '.join(data.column_names)}")
        columns = [data[c] for c in present]
        texts = [" ".join(str(part or "") for part in parts) for parts in zip(*columns, strict=True)]
        return texts, labels

    def _sample(self, labels: list[int], per_task: int | None, per_class: int | None, salt: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + salt)
        y = torch.tensor(labels)
        if per_class is not None:
            classes, k = torch.unique(y), per_class
            chosen = []
            for c in classes.tolist():
                idx = torch.nonzero(y == c).flatten()
                chosen.append(idx[torch.randperm(len(idx), generator=generator)][:k])
            return torch.sort(torch.cat(chosen)).values.tolist()
        order = torch.randperm(len(y), generator=generator)
        return torch.sort(order[:per_task] if per_task else order).values.tolist()

    def load(self) -> TextData:
        import hashlib

        key = hashlib.sha256(repr((self.names, self.tokenizer, self.max_length, self.train_per_task,
                                   self.train_per_class, self.test_per_task, self.seed, "uniform test draw, titles"))
                             .encode()).hexdigest()[:16]  # the last item: a cache of an earlier sampling is not reused
        cached = Path(self.cache_dir).expanduser() / f"text_cl5-{key}.pt" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return TextData(**torch.load(cached, weights_only=True))
        tasks = []
        for name in self.names:
            salt = sorted(CL5_DATASETS).index(name)
            train_texts, train_labels = self._split(name, "train")
            test_texts, test_labels = self._split(name, "test")
            keep = self._sample(train_labels, self.train_per_task, self.train_per_class, salt)
            test_keep = self._sample(test_labels, self.test_per_task, None, 100 + salt)
            tasks.append((name, [train_texts[i] for i in keep], [train_labels[i] for i in keep],
                          [test_texts[i] for i in test_keep], [test_labels[i] for i in test_keep]))
        data = assemble(tasks, self.tokenizer, self.max_length)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(cached.name + ".tmp")
            torch.save(dict(data.__dict__), tmp)
            tmp.replace(cached)
        return data
