"""Known benchmarks: their official file layout under ``data/``, prompts, token limits, and loaders to EvalSamples.

The layout, prompts, ``max_new_tokens`` and tile recommendations are those of the official ``internvl_chat/eval``
scripts (``vqa/evaluate_vqa.py``, ``refcoco/evaluate_grounding.py``, ``pope/evaluate_pope.py``, ``mme/eval.py``,
``mmbench/evaluate_mmbench.py``, ``evaluate.sh`` and the eval READMEs), so the files a user downloaded by following
the official instructions work as they are: put them under ``data/`` (``--data-root``) exactly as the official
READMEs say. ``eval/README.md`` lists the files per benchmark.

Paths inside the official files are relative to the folder that holds ``data/`` (the official scripts run from
``internvl_chat/``): ``"data/textvqa/train_images/x.jpg"`` is read as ``<data root>/textvqa/train_images/x.jpg``.

Dataset names: the official ``evaluate.sh`` keys (``vqa-textvqa-val``, ``refcoco``, ``mmbench-dev-en``, ...), the
official ``--datasets`` names (``textvqa_val``, ``refcoco+_testA``, ``mmbench_dev_20230712``, ...) and a few friendly
aliases (``infovqa_val``, ``mmbench_dev_en``, ``chartqa_test``). Some keys are groups: ``vqa-chartqa-test`` is both
ChartQA splits, ``refcoco`` all eight RefCOCO/+/g splits.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .samples import EvalSample

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "KEYS", "default_data_root", "load_benchmark",
           "missing_files", "resolve"]

# Official prompts (eval/vqa/evaluate_vqa.py and friends); appended as `question + ' ' + prompt`.
VQA_PROMPT = "Answer the question using a single word or phrase."
VIZWIZ_PROMPT = "When the provided information is insufficient, respond with 'Unanswerable'. "
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{}</ref>"
MMBENCH_PROMPT = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}


class BenchmarkError(ValueError):
    """A benchmark that cannot be loaded: unknown name, missing or malformed file. The message says what to do."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark split as the official scripts define it."""

    name: str                    # the official --datasets name, also the folder/file stem of its results
    family: str                  # vqa | refcoco | pope | mme | mmbench
    metric: str                  # eval.metrics name
    files: tuple[str, ...]       # required files/folders, relative to the data root
    max_new_tokens: int
    prompt_suffix: str = ""      # appended verbatim to the question
    max_num: int = 6             # the official recommended --max-num (eval/vqa/README.md), 6 otherwise
    how: str = ""                # where the files come from (error messages, layout notes)
    options: dict[str, Any] = field(default_factory=dict)
    metric_options: dict[str, Any] = field(default_factory=dict)  # passed to eval.metrics.compute


def _vqa(name: str, test: str, metric: str, tokens: int, how: str, annotation: str | None = None,
         prompt: str = VQA_PROMPT, max_num: int = 6) -> Benchmark:
    files = (test,) if annotation is None else (test, annotation)
    return Benchmark(name, "vqa", metric, files, tokens, " " + prompt if prompt else "", max_num, how,
                     {"test": test, "annotation": annotation})


_VQA_HOW = "the converted files of the official eval/vqa/README.md"
_BENCHMARKS = [
    # eval/vqa/evaluate_vqa.py ds_collections: metric vqa_score -> vqa_acc with the 10 answers of the annotation
    _vqa("textvqa_val", "textvqa/textvqa_val.jsonl", "vqa_acc", 10, _VQA_HOW,
         annotation="textvqa/textvqa_val_annotations.json"),
    _vqa("okvqa_val", "okvqa/okvqa_val.jsonl", "vqa_acc", 10, _VQA_HOW,
         annotation="okvqa/mscoco_val2014_annotations.json"),
    _vqa("vqav2_val", "vqav2/vqav2_val.jsonl", "vqa_acc", 10, _VQA_HOW,
         annotation="vqav2/v2_mscoco_val2014_annotations.json"),
    _vqa("vizwiz_val", "vizwiz/vizwiz_val.jsonl", "vqa_acc", 10, _VQA_HOW,
         annotation="vizwiz/vizwiz_val_annotations.json", prompt=VIZWIZ_PROMPT + VQA_PROMPT),
    # anls / relaxed_accuracy / accuracy: references are the "answer" field of each line
    _vqa("docvqa_val", "docvqa/val.jsonl", "anls", 100, _VQA_HOW, max_num=18),
    _vqa("infographicsvqa_val", "infographicsvqa/val.jsonl", "anls", 100, _VQA_HOW, max_num=24),
    _vqa("chartqa_test_human", "chartqa/test_human.jsonl", "relaxed_acc", 100, _VQA_HOW, max_num=12),
    _vqa("chartqa_test_augmented", "chartqa/test_augmented.jsonl", "relaxed_acc", 100, _VQA_HOW, max_num=12),
    _vqa("ocrvqa_val", "ocrvqa/ocrvqa_val.jsonl", "exact_match", 100, _VQA_HOW),
    _vqa("ocrvqa_test", "ocrvqa/ocrvqa_test.jsonl", "exact_match", 100, _VQA_HOW),
    # AI2D: the VLMEvalKit-style question already lists the options; no suffix
    _vqa("ai2diagram_test", "ai2diagram/test_vlmevalkit.jsonl", "exact_match", 10, _VQA_HOW, prompt=""),
]
_REFCOCO_SPLITS = ("refcoco_val", "refcoco_testA", "refcoco_testB", "refcoco+_val", "refcoco+_testA",
                   "refcoco+_testB", "refcocog_val", "refcocog_test")
_BENCHMARKS += [
    Benchmark(split, "refcoco", "iou_acc", (f"refcoco/{split}.jsonl",), 100, "", 6,
              "the converted files of the official eval/refcoco/README.md (COCO train2014 images under data/coco)")
    for split in _REFCOCO_SPLITS
]
_POPE_CATEGORIES = ("adversarial", "popular", "random")
_BENCHMARKS += [
    # The POPE questions already end with the VQA prompt (the official script keeps it): no suffix.
    Benchmark("pope", "pope", "yesno",
              ("pope/llava_pope_test.jsonl", "pope/val2014", *(f"pope/coco/coco_pope_{c}.json"
                                                               for c in _POPE_CATEGORIES)),
              100, "", 6, "eval/pope/README.md: llava_pope_test.jsonl, the POPE coco/ label files, COCO val2014"),
    Benchmark("mme", "mme", "yesno", ("mme/Your_Results", "mme/MME_Benchmark_release_version"), 20,
              " " + VQA_PROMPT, 6,
              "eval/mme/README.md (MME_Benchmark_release_version) and the question lists of the official "
              "internvl_chat/eval/mme/Your_Results/ folder", metric_options={"style": "mme"}),
]
_MMBENCH = {"mmbench_dev_20230712": "en", "mmbench_dev_en_20231003": "en", "mmbench_dev_cn_20231003": "cn",
            "ccbench_dev_cn": "cn"}
_BENCHMARKS += [
    Benchmark(name, "mmbench", "mc_acc",
              (f"mmbench/{'CCBench_legacy' if name == 'ccbench_dev_cn' else name}.tsv",), 100,
              "\n" + MMBENCH_PROMPT[lang], 6, "eval/mmbench/README.md (the .tsv files)", {"language": lang})
    for name, lang in _MMBENCH.items()
]
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _BENCHMARKS}

# Dataset keys -> the benchmarks they run (official evaluate.sh keys, official names, friendly aliases).
KEYS: dict[str, tuple[str, ...]] = {name: (name,) for name in BENCHMARKS}
KEYS.update({
    "vqa-textvqa-val": ("textvqa_val",), "vqa-okvqa-val": ("okvqa_val",), "vqa-vqav2-val": ("vqav2_val",),
    "vqa-vizwiz-val": ("vizwiz_val",), "vqa-docvqa-val": ("docvqa_val",),
    "vqa-infovqa-val": ("infographicsvqa_val",), "infovqa_val": ("infographicsvqa_val",),
    "vqa-chartqa-test": ("chartqa_test_human", "chartqa_test_augmented"),
    "chartqa_test": ("chartqa_test_human", "chartqa_test_augmented"),
    "vqa-chartqa-test-human": ("chartqa_test_human",), "vqa-chartqa-test-augmented": ("chartqa_test_augmented",),
    "vqa-ocrvqa-val": ("ocrvqa_val",), "vqa-ocrvqa-test": ("ocrvqa_test",),
    "vqa-ai2d-test": ("ai2diagram_test",), "ai2d_test": ("ai2diagram_test",),
    "refcoco": _REFCOCO_SPLITS,
    "mmbench-dev-en": ("mmbench_dev_20230712",), "mmbench_dev_en": ("mmbench_dev_20230712",),
    "mmbench-dev-cn": ("mmbench_dev_cn_20231003",), "mmbench_dev_cn": ("mmbench_dev_cn_20231003",),
    "ccbench-dev": ("ccbench_dev_cn",),
})
KEYS.update({split.replace("_", "-", 1): (split,) for split in _REFCOCO_SPLITS})  # refcoco-val, refcoco+-testA


def resolve(key: str) -> list[Benchmark]:
    """The benchmarks a dataset key stands for; :class:`BenchmarkError` listing the known keys otherwise."""
    names = KEYS.get(key) or KEYS.get(key.replace("-", "_"))
    if names is None:
        known = ", ".join(sorted(k for k in KEYS if k not in BENCHMARKS)) + "; or " + ", ".join(sorted(BENCHMARKS))
        raise BenchmarkError(f"unknown dataset {key!r}: not a file and not a known benchmark. Known: {known}. "
                             "For your own data pass the path of an eval JSONL (training conversation format).")
    return [BENCHMARKS[n] for n in names]


def default_data_root(cwd: str | None = None) -> str:
    """``./data`` when it exists (the official scripts run next to data/), else ``<repository>/data``."""
    here = os.path.join(cwd or os.getcwd(), "data")
    if os.path.isdir(here):
        return here
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def missing_files(bench: Benchmark, data_root: str) -> list[str]:
    return [os.path.join(data_root, f) for f in bench.files if not os.path.exists(os.path.join(data_root, f))]


def check_files(bench: Benchmark, data_root: str) -> None:
    missing = missing_files(bench, data_root)
    if missing:
        raise BenchmarkError(
            f"{bench.name}: missing {', '.join(missing)}. Put there {bench.how} (official layout; eval/README.md "
            f"lists the files of every benchmark); --data-root points at another data folder.")


def load_benchmark(bench: Benchmark, data_root: str, limit: int | None = None) -> list[EvalSample]:
    """The samples of one benchmark, in file order (the first ``limit`` only, when given)."""
    check_files(bench, data_root)
    samples = _LOADERS[bench.family](bench, data_root, limit)
    if not samples:
        raise BenchmarkError(f"{bench.name}: no samples in {', '.join(bench.files)} under {data_root}")
    _check_images(samples)
    return samples


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _media_path(data_root: str, path: str) -> str:
    """An official path ("data/x/y.jpg", relative to the folder holding data/) under our data root."""
    if os.path.isabs(path):
        return path
    norm = path.replace("\\", "/")
    if norm.startswith("./"):
        norm = norm[2:]
    if norm.startswith("data/"):
        return os.path.join(data_root, norm[len("data/"):])
    return os.path.join(os.path.dirname(os.path.abspath(data_root)), norm)


def _jsonl(path: str, limit: int | None = None):
    """(line number, object) of a JSONL file; a bad line is a BenchmarkError naming file:line."""
    count = 0
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                return
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise BenchmarkError(f"{path}:{line_no}: invalid JSON: {exc}") from None
            if not isinstance(value, dict):
                raise BenchmarkError(f"{path}:{line_no}: expected a JSON object, got {type(value).__name__}")
            count += 1
            yield line_no, value


def _need(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise BenchmarkError(f"{where}: missing key(s) {', '.join(missing)} (official format has "
                             f"{', '.join(keys)})")


def _str_list(value: Any, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
        raise BenchmarkError(f"{where}: the reference answer must be a string or a list of strings, got {value!r}")
    return [str(v) for v in values]


def _check_images(samples: list[EvalSample]) -> None:
    missing = [(s, p) for s in samples for p in s.images if not os.path.isfile(p)]
    if missing:
        sample, path = missing[0]
        raise BenchmarkError(f"{len(missing)} of {len(samples)} image(s) not found, the first: {path} "
                             f"(from {sample.source}); put the benchmark's images there (official layout)")


# ---------------------------------------------------------------------------------------------------------------
# loaders, one per family


def _load_vqa(bench: Benchmark, root: str, limit: int | None) -> list[EvalSample]:
    test = os.path.join(root, bench.options["test"])
    answers_of: dict[Any, list[str]] | None = None
    if bench.options.get("annotation"):
        answers_of = _vqa_annotations(os.path.join(root, bench.options["annotation"]))
    samples = []
    for line_no, rec in _jsonl(test, limit):
        where = f"{test}:{line_no}"
        _need(rec, ("image", "question", "question_id"), where)
        qid = rec["question_id"]
        if answers_of is not None:
            if qid not in answers_of:
                raise BenchmarkError(f"{where}: question_id {qid!r} has no entry in {bench.options['annotation']}")
            answers = answers_of[qid]
        else:
            _need(rec, ("answer",), where)
            answers = _str_list(rec["answer"], where)
        samples.append(EvalSample(
            id=qid, question=rec["question"], reference=answers[0], metric=bench.metric,
            images=[_media_path(root, rec["image"])], record_extras={"answers": answers, "question_id": qid},
            source=where))
    return samples


def _vqa_annotations(path: str) -> dict[Any, list[str]]:
    """question_id -> the answers of a VQA-style annotation file ({"annotations": [{"question_id", "answers":
    [{"answer": ...}, ...]}]}: TextVQA, VQAv2, OK-VQA, VizWiz converted files)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return {item["question_id"]: [str(a["answer"]) for a in item["answers"]] for item in data["annotations"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchmarkError(f"{path}: not a VQA annotation file ({{'annotations': [{{'question_id', 'answers': "
                             f"[{{'answer'}}]}}]}}): {type(exc).__name__}: {exc}") from None


def _load_refcoco(bench: Benchmark, root: str, limit: int | None) -> list[EvalSample]:
    path = os.path.join(root, bench.files[0])
    samples = []
    for line_no, rec in _jsonl(path, limit):
        where = f"{path}:{line_no}"
        _need(rec, ("image", "sent", "bbox", "width", "height"), where)
        box = rec["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise BenchmarkError(f"{where}: bbox must be [x1, y1, x2, y2] in pixels, got {box!r}")
        samples.append(EvalSample(
            id=f"{bench.name}:{line_no}", question=GROUNDING_PROMPT.format(rec["sent"]), reference=json.dumps(box),
            metric=bench.metric, images=[_media_path(root, rec["image"])],
            record_extras={"box": [float(v) for v in box], "width": rec["width"], "height": rec["height"]},
            source=where))
    return samples


def _load_pope(bench: Benchmark, root: str, limit: int | None) -> list[EvalSample]:
    """Questions from llava_pope_test.jsonl; the label of the k-th question of a category is line k of
    coco/coco_pope_<category>.json (the official eval_pope.py pairs them by order within the category)."""
    questions_path = os.path.join(root, "pope/llava_pope_test.jsonl")
    labels: dict[str, list[str]] = {}
    for category in _POPE_CATEGORIES:
        label_path = os.path.join(root, f"pope/coco/coco_pope_{category}.json")
        labels[category] = [str(rec.get("label")) for _, rec in _jsonl(label_path)]
    seen: dict[str, int] = {}
    samples = []
    for line_no, rec in _jsonl(questions_path):
        where = f"{questions_path}:{line_no}"
        _need(rec, ("question_id", "image", "text", "category"), where)
        category = rec["category"]
        if category not in labels:
            raise BenchmarkError(f"{where}: unknown category {category!r} (POPE has {', '.join(_POPE_CATEGORIES)})")
        k = seen.get(category, 0)
        seen[category] = k + 1
        if k >= len(labels[category]):
            raise BenchmarkError(f"{where}: more {category} questions than labels in coco/coco_pope_{category}.json")
        if limit is not None and len(samples) >= limit:
            continue  # keep counting: a short label file is still reported
        samples.append(EvalSample(
            id=rec["question_id"], question=str(rec["text"]).strip(), reference=labels[category][k],
            metric=bench.metric, images=[os.path.join(root, "pope/val2014", rec["image"])],
            record_extras={"category": category, "question_id": rec["question_id"]}, source=where))
    return samples


def _load_mme(bench: Benchmark, root: str, limit: int | None) -> list[EvalSample]:
    """Your_Results/<task>.txt lines `image<TAB>question<TAB>yes|no`; images under
    MME_Benchmark_release_version/<task>/<image> (official eval/mme/eval.py)."""
    lists = os.path.join(root, "mme/Your_Results")
    images = os.path.join(root, "mme/MME_Benchmark_release_version")
    samples = []
    for filename in sorted(os.listdir(lists)):  # official: os.listdir order (arbitrary); sorted is reproducible
        if not filename.endswith(".txt"):
            continue
        task = filename[:-len(".txt")]
        path = os.path.join(lists, filename)
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) < 3:
                    raise BenchmarkError(f"{path}:{line_no}: expected image<TAB>question<TAB>answer")
                image, question, answer = parts[:3]
                if limit is not None and len(samples) >= limit:
                    return samples
                samples.append(EvalSample(
                    id=f"{task}/{image}:{line_no}", question=question, reference=answer, metric=bench.metric,
                    images=[os.path.join(images, task, image)],
                    record_extras={"category": task, "question_id": f"{task}/{image}"},
                    source=f"{path}:{line_no}"))
    return samples


# pandas.read_csv's default missing-value strings: the official MMBench loader (pandas) treats an option or hint
# spelled like this as absent, so we do too.
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _load_mmbench(bench: Benchmark, root: str, limit: int | None) -> list[EvalSample]:
    path = os.path.join(root, bench.files[0])
    cache = _image_cache(path)
    csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
    samples = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        for row_no, row in enumerate(reader, start=1):
            if limit is not None and len(samples) >= limit:
                break
            where = f"{path}:{row_no + 1}"
            _need(row, ("index", "question", "image"), where)
            value = {k: (None if v is None or v in _PANDAS_NA else v) for k, v in row.items() if k is not None}
            options = {c: value[c] for c in "ABCDE" if value.get(c) is not None}
            question = value["question"] or ""
            if value.get("hint") is not None:
                question = value["hint"] + "\n" + question
            question += "".join(f"\n{k}. {v}" for k, v in options.items())
            image = os.path.join(cache, f"{value['index']}.img")
            if not os.path.exists(image):
                _write_atomic(image, _b64(row["image"], where))
            extras: dict[str, Any] = {"options": options, "question_id": value["index"]}
            if value.get("category") is not None:
                extras["category"] = value["category"]
            samples.append(EvalSample(
                id=value["index"], question=question, reference=value.get("answer") or "", metric=bench.metric,
                images=[image], record_extras=extras, source=where))
    if samples and not any(s.reference for s in samples):
        raise BenchmarkError(f"{path}: no 'answer' column: a test split is scored by the official server only")
    return samples


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except ValueError as exc:
        raise BenchmarkError(f"{where}: the image column is not base64: {exc}") from None


def _image_cache(tsv: str) -> str:
    """A folder for the decoded MMBench images, keyed by the TSV's path, size and mtime (shared by all ranks)."""
    stat = os.stat(tsv)
    key = hashlib.sha1(f"{os.path.abspath(tsv)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "internvl_eval_images", key)
    os.makedirs(folder, exist_ok=True)
    return folder


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)  # two ranks decoding the same image never leave a half-written file


_LOADERS: dict[str, Callable[[Benchmark, str, int | None], list[EvalSample]]] = {
    "vqa": _load_vqa, "refcoco": _load_refcoco, "pope": _load_pope, "mme": _load_mme, "mmbench": _load_mmbench,
}
