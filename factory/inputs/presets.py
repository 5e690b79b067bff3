"""The labelled sets of the paper's Table 1 as presets: where each lies on the Hub and how its rows map to
LLMBar format (LLMBar Natural and Adversarial, MT-Bench human judgments, InstruSum, HREF).

`--data mtbench` loads one from the Hub, `--data mtbench=FILE` maps a local file in the same layout
(`factory.inputs.labelled_sets` reads either).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from factory.core.errors import UserInputError
from factory.core.text import clip_value, message_line
from factory.inputs.sources import read_dataset


@dataclass(frozen=True)
class Preset:
    """A published pairwise set: where it lies on the Hub and how its rows become LLMBar-format rows."""

    name: str
    title: str
    hub: str
    config: str | None
    splits: tuple[str, ...]
    columns: tuple[str, ...]
    """The source columns the mapping reads (a local file must have them)."""
    convert: Callable[[list[dict[str, Any]], str], tuple[list[dict[str, Any]], list[str]]]
    """Rows in the Hub layout → (LLMBar-format rows, notes on what was left out)."""
    mapping: str
    """One line for --help and the docs: how the rows are mapped."""


def _need(rows: list[dict[str, Any]], columns: tuple[str, ...], where: str, preset: str) -> None:
    """Every row has the preset's source columns, or one error line naming the first one missing."""
    for n, r in enumerate(rows):
        missing = [c for c in columns if c not in r]
        if missing:
            raise UserInputError(
                f"{where}: row {n}: not in the {preset} layout: no column '{missing[0]}' "
                f"(expected {list(columns)}; found {clip_value(sorted(r))})"
            )


def _convert_llmbar(rows: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """LLMBar rows are already the format; a row read from a Hub split is tagged with it (`subset`), and its id
    is `<subset>-<position in the subset>` when it has none."""
    seen: Counter[str] = Counter()
    out = []
    for r in rows:
        row = dict(r)
        subset = row.pop("subset", None)
        if subset is not None and row.get("id") is None:
            row["id"] = f"{subset}-{seen[str(subset)]}"
            seen[str(subset)] += 1
        out.append(row)
    return out, []


def _turn_text(conversation: Any, role: str, where: str) -> str:
    """The first message of `role` in a conversation (a list of {role, content})."""
    if not isinstance(conversation, list):
        raise UserInputError(f"{where}: a conversation must be a list of messages, got {type(conversation).__name__}")
    for m in conversation:
        if isinstance(m, dict) and m.get("role") == role:
            if not isinstance(m.get("content"), str):
                raise UserInputError(f"{where}: the first '{role}' message has no text content")
            return m["content"]
    raise UserInputError(f"{where}: the conversation has no '{role}' message")


def _majority(votes: Counter[Any]) -> Any:
    """The value with strictly the most votes, else None (a tie between the top two)."""
    top = votes.most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


MTBENCH_COLUMNS = ("question_id", "model_a", "model_b", "winner", "conversation_a", "conversation_b", "turn")


def _convert_mtbench(rows: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """MT-Bench human judgments: first turn only; the judges of one (question, model pair) vote, in either
    orientation; a pair whose majority is a tie, or that has no majority, is dropped. output_1 is model_a of
    the pair's first judgment."""
    _need(rows, MTBENCH_COLUMNS, where, "mtbench")
    later = 0
    groups: dict[tuple[str, frozenset[str]], tuple[dict[str, Any], Counter[str]]] = {}
    for n, r in enumerate(rows):
        if str(r["turn"]) != "1":
            later += 1
            continue
        winner = str(r["winner"])
        if winner.startswith("tie"):
            vote = "tie"
        elif winner in ("model_a", "model_b"):
            vote = str(r[winner])
        else:
            raise UserInputError(
                f"{where}: row {n}: winner must be model_a, model_b or tie, got {clip_value(r['winner'])}"
            )
        key = (str(r["question_id"]), frozenset((str(r["model_a"]), str(r["model_b"]))))
        first, votes = groups.setdefault(key, (r, Counter()))
        votes[vote] += 1
    out, dropped = [], 0
    for (qid, _), (first, votes) in groups.items():
        winner = _majority(votes)
        if winner is None or winner == "tie":
            dropped += 1
            continue
        where_row = f"{where}: question {qid}"
        out.append(
            {
                "id": f"{qid}-{first['model_a']}-{first['model_b']}",
                "instruction": _turn_text(first["conversation_a"], "user", where_row),
                "output_1": _turn_text(first["conversation_a"], "assistant", where_row),
                "output_2": _turn_text(first["conversation_b"], "assistant", where_row),
                "label": 1 if winner == str(first["model_a"]) else 2,
            }
        )
    judged = sum(sum(v.values()) for _, v in groups.values())
    notes = [
        f"{where}: first turn only ({later} later-turn judgments left out); {judged} first-turn judgments of "
        f"{len(groups)} (question, model pair)s voted; {dropped} pair(s) tied or without a majority dropped; "
        f"{len(out)} cases"
    ]
    return out, notes


INSTRUSUM_COLUMNS = ("article", "requirement", "output_1", "output_2", "winner")
INSTRUSUM_INSTRUCTION = (
    "Here is an article:\n{article}\n\nHere is a summary requirement:\n{requirement}\n\n"
    "Please summarize the above article based on the given requirement:"
)
"""How an InstruSum case reads as one instruction: the layout of ReIFE's InstruSum file."""


def _convert_instrusum(rows: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """InstruSum's `human_eval_pairwise` (ties already excluded by its authors): the article and the summary
    requirement become the instruction; `winner` (1 or 2) is the label; the id names the document and systems."""
    _need(rows, INSTRUSUM_COLUMNS, where, "instrusum")
    out = []
    for n, r in enumerate(rows):
        for column in ("article", "requirement"):
            if not isinstance(r[column], str):
                raise UserInputError(
                    f"{where}: row {n}: column '{column}' must be text, got {type(r[column]).__name__}"
                )
        parts = [r.get(k) for k in ("doc_id", "sys_1", "sys_2")]
        case_id = "-".join(str(p) for p in parts) if all(p is not None for p in parts) else None
        out.append(
            {
                "id": r.get("id", case_id),
                "instruction": INSTRUSUM_INSTRUCTION.format(
                    article=r["article"].strip(), requirement=r["requirement"].strip()
                ),
                "output_1": r["output_1"],
                "output_2": r["output_2"],
                "label": r["winner"],
            }
        )
    return out, []


HREF_COLUMNS = ("instruction", "output_a", "output_b", "annotations", "reference")


def _convert_href(rows: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """HREF's human preference set: output_a / output_b become output_1 / output_2; the annotators' votes
    (1: output_a, 2: output_b, 0: tie) decide the label by majority, and a tie or a majority of ties is
    dropped; the human-written `reference` is kept (for href-ref and the other reference protocols)."""
    _need(rows, HREF_COLUMNS, where, "href")
    out, dropped = [], 0
    for n, r in enumerate(rows):
        votes = r["annotations"]
        if not isinstance(votes, list) or not votes:
            raise UserInputError(f"{where}: row {n}: 'annotations' must be a non-empty list of votes (0, 1 or 2)")
        try:
            counted = Counter(int(v) for v in votes)
        except (TypeError, ValueError):
            raise UserInputError(f"{where}: row {n}: 'annotations' must hold votes 0, 1 or 2") from None
        if set(counted) - {0, 1, 2}:
            raise UserInputError(f"{where}: row {n}: 'annotations' must hold votes 0, 1 or 2, got {sorted(counted)}")
        label = _majority(counted)
        if not label:
            dropped += 1
            continue
        out.append(
            {
                "id": r.get("id", str(n)),
                "instruction": r["instruction"],
                "output_1": r["output_a"],
                "output_2": r["output_b"],
                "label": label,
                "reference": r["reference"],
            }
        )
    notes = (
        [f"{where}: {dropped} of {len(rows)} pair(s) without a majority preference (ties) dropped"] if dropped else []
    )
    return out, notes


LLMBAR_COLUMNS = ("output_1", "output_2")
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llmbar-natural",
            "LLMBar Natural",
            "princeton-nlp/LLMBar",
            "LLMBar",
            ("Natural",),
            LLMBAR_COLUMNS,
            _convert_llmbar,
            "LLMBar's own format (input, output_1, output_2, label)",
        ),
        Preset(
            "llmbar-adversarial",
            "LLMBar Adversarial",
            "princeton-nlp/LLMBar",
            "LLMBar",
            ("Adversarial_Neighbor", "Adversarial_GPTInst", "Adversarial_GPTOut", "Adversarial_Manual"),
            LLMBAR_COLUMNS,
            _convert_llmbar,
            "the four Adversarial subsets together, in LLMBar's own format; ids <subset>-<n>",
        ),
        Preset(
            "mtbench",
            "MT-Bench human judgments",
            "lmsys/mt_bench_human_judgments",
            None,
            ("human",),
            MTBENCH_COLUMNS,
            _convert_mtbench,
            "first turn of conversation_a / conversation_b; majority of the human votes per (question, model "
            "pair); ties dropped",
        ),
        Preset(
            "instrusum",
            "InstruSum",
            "Salesforce/InstruSum",
            "human_eval_pairwise",
            ("data",),
            INSTRUSUM_COLUMNS,
            _convert_instrusum,
            "article + requirement as the instruction; output_1, output_2; winner as the label",
        ),
        Preset(
            "href",
            "HREF",
            "allenai/href_preference",
            None,
            ("dev",),
            HREF_COLUMNS,
            _convert_href,
            "output_a / output_b; majority of the annotations (ties dropped); the human reference kept",
        ),
    )
}
"""The sets of the paper's Table 1, by the name `--data` takes."""


def hub_records(preset: Preset) -> list[Any]:
    """A preset's rows from the Hub (every split, tagged with it when there are several), or one error line."""
    records: list[Any] = []
    for split in preset.splits:
        try:
            rows = read_dataset(preset.hub, folder=None, split=split, config=preset.config)
        except UserInputError as exc:
            reason = str(exc).removeprefix(f"{preset.hub}: ").removeprefix("could not load the dataset: ")
            where = f"{preset.hub}" + (f" ({preset.config}, split {split})" if preset.config else f" (split {split})")
            raise UserInputError(
                f"--data {preset.name}: could not load {where} from the Hugging Face Hub: {message_line(reason)}; "
                f"without network, give {preset.name}=FILE with the rows in the same layout"
            ) from None
        if len(preset.splits) > 1:
            rows = [{**r, "subset": split} if isinstance(r, dict) else r for r in rows]
        records.extend(rows)
    return records
