"""Arrow schemas of every table (docs/DESIGN.md §3). `python -m factory.warehouse.schemas` writes them to schemas/."""

from __future__ import annotations

import pyarrow as pa

PROVENANCE = [
    ("recipe", pa.string()),
    ("run_id", pa.string()),
    ("stage_key", pa.string()),
    ("round", pa.int64()),  # the self-improvement round that wrote the row (0: SFT); null outside rounds
]
TOP_LOGPROBS = pa.list_(pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64())])))
ACCOUNTING = [
    ("tokens_in", pa.int64()),
    ("tokens_out", pa.int64()),
    ("latency_s", pa.float64()),
]
# Model-call rows also keep what an HTTP backend spent on them; null for local engines (never retried or priced).
CALL_ACCOUNTING = [
    *ACCOUNTING,
    ("retries", pa.int64()),  # requests repeated after a 429, 5xx, timeout, dropped connection or bad JSON
    ("cost_usd", pa.float64()),  # tokens × the model's price; null when the price is unknown
]


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(fields))


def _verdict_columns(*scores: tuple[str, pa.DataType]) -> list[tuple[str, pa.DataType]]:
    """The columns of one parsed judge verdict, shared by `judgments`, `eval_judgments` and `eval`; `scores` are
    a table's own scores read from it, placed after p_a_exact."""
    return [
        ("raw_output", pa.string()),
        ("verdict", pa.string()),  # a | b | null (never guessed)
        ("p_a", pa.float64()),
        ("p_a_exact", pa.float64()),  # the soft score counting only the tokens `a` and `b` (the paper's rule)
        *scores,
        ("p_source", pa.string()),
        ("marker_tokens", pa.string()),
        ("parse_status", pa.string()),  # ok | no_match | invalid_marker | error
        ("error", pa.string()),
    ]


# How a judge was asked for its answer (`judgments` and `eval_judgments`).
ANSWER_SETTINGS = [
    ("prefill", pa.string()),  # the text the answer was prefilled with ("" for none)
    ("markers", pa.string()),  # variants | exact: which tokens the soft score p_a counts
    ("top_logprobs", pa.int64()),  # how many alternatives per token the judge returned
]


STAGE_TABLES: dict[str, pa.Schema] = {
    "prompts": _schema(
        *PROVENANCE,
        ("prompt_id", pa.string()),
        ("messages", pa.string()),  # JSON list of chat messages (system + user)
        ("instruction", pa.string()),
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("source_id", pa.string()),
        ("reference_fields", pa.string()),  # JSON {column: text} kept for `column` references
    ),
    "references": _schema(
        *PROVENANCE,
        ("prompt_id", pa.string()),
        ("reference_name", pa.string()),
        ("text", pa.string()),
        ("source_kind", pa.string()),  # human | model
        ("model", pa.string()),
        ("request_key", pa.string()),
        ("status", pa.string()),  # ok | error | missing
        ("error", pa.string()),
        *ACCOUNTING,
    ),
    "samples": _schema(
        *PROVENANCE,
        ("sample_id", pa.string()),
        ("prompt_id", pa.string()),
        ("policy", pa.string()),
        ("sample_index", pa.int64()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),  # stop | length | error
        ("n_tokens", pa.int64()),
        ("n_prompt_tokens", pa.int64()),
        ("request_key", pa.string()),
        ("error", pa.string()),
        *ACCOUNTING,
    ),
    "judgments": _schema(
        *PROVENANCE,
        ("prompt_id", pa.string()),
        ("sample_a", pa.string()),
        ("sample_b", pa.string()),
        ("order", pa.string()),  # forward (a has the lower sample index) | swapped
        ("protocol", pa.string()),
        ("judge", pa.string()),
        ("reference_name", pa.string()),
        ("prompt_hash", pa.string()),
        *_verdict_columns(),
        *ANSWER_SETTINGS,
        ("request_key", pa.string()),
        ("schedule", pa.string()),  # all-pairs | adaptive
        ("schedule_round", pa.int64()),  # the round of the schedule that asked for this comparison (from 1)
        *ACCOUNTING,
    ),
    "scores": _schema(
        *PROVENANCE,
        ("sample_id", pa.string()),
        ("prompt_id", pa.string()),
        ("labeler", pa.string()),  # judgments | rewards | similarity
        ("score", pa.float64()),  # judgments: mean soft win probability; rewards: reward; similarity: ROUGE-L F1
        ("n_comparisons", pa.int64()),
        ("wins", pa.int64()),  # comparisons whose parsed verdict named this sample
    ),
    "pairs": _schema(
        *PROVENANCE,
        ("prompt_id", pa.string()),
        ("chosen_sample_id", pa.string()),
        ("rejected_sample_id", pa.string()),
        ("chosen_score", pa.float64()),
        ("rejected_score", pa.float64()),
        ("margin", pa.float64()),
    ),
}

# `factory judge-eval`: one judge call on an ordered pair of a human-labelled meta-evaluation case. Kept
# apart from `judgments` (which orders a policy's samples) so neither table's queries need a filter.
STAGE_TABLES["eval_judgments"] = _schema(
    *PROVENANCE,
    ("purpose", pa.string()),  # meta-eval
    ("dataset", pa.string()),
    ("case_id", pa.string()),
    ("case_index", pa.int64()),  # position in the dataset file
    ("label", pa.int64()),  # the human label: 1 (output_1 is better) or 2
    ("judge", pa.string()),
    ("protocol", pa.string()),
    ("reference_name", pa.string()),  # null for protocols that show no reference
    ("order", pa.string()),  # forward (output_1 shown as (a)) | swapped (output_2 shown as (a)) | swapped_blocks
    # (output_1 stays (a), output_2 stays (b), and (b)'s block is shown first)
    ("prompt_hash", pa.string()),
    *_verdict_columns(),
    *ANSWER_SETTINGS,
    ("len_a", pa.int64()),  # characters of the output shown as (a)
    ("len_b", pa.int64()),
    ("request_key", pa.string()),
    *ACCOUNTING,
)

# `factory train`: one row per trained candidate (one per β of a sweep), and each logged step of each.
STAGE_TABLES["trainings"] = _schema(
    *PROVENANCE,
    ("training_name", pa.string()),
    ("method", pa.string()),  # dpo | sft
    ("base_model", pa.string()),
    ("base_identity", pa.string()),  # JSON: the base model's identity in request keys
    ("dataset", pa.string()),
    ("dataset_hash", pa.string()),
    ("settings", pa.string()),  # JSON: every value the trainer was given
    ("beta", pa.float64()),
    ("selected", pa.bool_()),  # the candidate kept in an output folder (chosen by `selected_by`)
    ("steps", pa.int64()),
    ("final_train_loss", pa.float64()),
    ("val_loss", pa.float64()),  # the final evaluation's validation loss
    ("best_val_loss", pa.float64()),  # the lowest validation loss within this candidate's run (its kept step)
    ("train_rows", pa.int64()),
    ("examples_cut", pa.int64()),  # examples longer than max_length, cut by the trainer
    ("output", pa.string()),
    ("model_hash", pa.string()),  # hash of the trained weights and config: the model's identity
    ("seconds", pa.float64()),
    # Added with per-run checkpoint selection (null in rows written before):
    ("selected_by", pa.string()),  # only (one candidate) | val_accuracy | eval | all: the rule that kept the model
    ("best_step", pa.int64()),  # the optimizer step of the kept checkpoint within this candidate's run
    ("val_accuracy", pa.float64()),  # share of validation pairs whose implicit reward ranks chosen first, there
    ("eval_win_rate", pa.float64()),  # select: eval: the kept checkpoint's held-out win rate (percent)
    ("warmup_steps", pa.int64()),  # warm-up as whole optimizer steps (share × counted steps, rounded down)
    ("examples_per_step", pa.int64()),  # batch_size × gradient_accumulation × devices
)
STAGE_TABLES["training_metrics"] = _schema(
    *PROVENANCE,
    ("training_name", pa.string()),
    ("beta", pa.float64()),
    ("step", pa.int64()),
    ("epoch", pa.float64()),
    ("loss", pa.float64()),
    ("val_loss", pa.float64()),
    ("learning_rate", pa.float64()),
    ("grad_norm", pa.float64()),
    ("rewards_chosen", pa.float64()),
    ("rewards_rejected", pa.float64()),
    ("rewards_accuracies", pa.float64()),
    ("rewards_margins", pa.float64()),
    # An evaluation on the validation split (every eval_steps and at the end; val_loss set, loss null):
    ("val_rewards_chosen", pa.float64()),
    ("val_rewards_rejected", pa.float64()),
    ("val_rewards_accuracies", pa.float64()),
    ("val_rewards_margins", pa.float64()),
)

# `factory eval` (and a recipe's `eval:` section): a policy's answers to held-out prompts, the baseline's
# when a model writes it, each judged in both orders, and one result row per policy × baseline × judge.
STAGE_TABLES["eval_outputs"] = _schema(
    *PROVENANCE,
    ("prompt_id", pa.string()),
    ("role", pa.string()),  # policy | baseline
    ("contender", pa.string()),  # the policy's label (a model name, or <recipe>.r<k> for a round's checkpoint)
    ("model_hash", pa.string()),  # hash of the model's identity in request keys
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("request_key", pa.string()),
    ("error", pa.string()),
    *ACCOUNTING,
)
STAGE_TABLES["eval"] = _schema(
    *PROVENANCE,
    ("prompt_id", pa.string()),
    ("contender", pa.string()),
    ("baseline", pa.string()),  # the baseline column, or model:<name>
    ("judge", pa.string()),
    ("protocol", pa.string()),
    ("reference_name", pa.string()),
    ("order", pa.string()),  # policy_first (the policy is Output (a)) | baseline_first
    *_verdict_columns(
        ("p_policy", pa.float64()),  # P(the policy's output is better) read from this judgment; null if unparsed
    ),
    ("len_policy", pa.int64()),  # characters
    ("len_baseline", pa.int64()),
    ("request_key", pa.string()),
    *ACCOUNTING,
)
STAGE_TABLES["eval_results"] = _schema(
    *PROVENANCE,
    ("contender", pa.string()),
    ("model_hash", pa.string()),
    ("baseline", pa.string()),
    ("judge", pa.string()),
    ("protocol", pa.string()),
    ("scoring", pa.string()),  # logprob | verdict
    ("prompts", pa.int64()),  # held-out prompts
    ("scored", pa.int64()),  # prompts with at least one parsed order (the rest are never guessed)
    ("unparsed_judgments", pa.int64()),
    ("win_rate", pa.float64()),  # percent: mean over scored prompts of P(policy better)
    ("win_rate_low", pa.float64()),  # bootstrap percentile interval (95 %)
    ("win_rate_high", pa.float64()),
    ("lc_win_rate", pa.float64()),  # AlpacaEval 2 length-controlled win rate (length term set to zero)
    ("lc_win_rate_low", pa.float64()),
    ("lc_win_rate_high", pa.float64()),
    ("length_coefficient", pa.float64()),  # the fitted weight of tanh(standardised length difference)
    ("wins", pa.int64()),  # prompts whose every parsed verdict favours the policy
    ("losses", pa.int64()),  # ... the baseline
    ("ties", pa.int64()),  # prompts whose two verdicts split
    ("avg_len_policy", pa.float64()),
    ("avg_len_baseline", pa.float64()),
    ("resamples", pa.int64()),
)

# `factory publish`: one row per upload of an export to the Hub (never the token).
STAGE_TABLES["publications"] = _schema(
    *PROVENANCE,
    ("repo_id", pa.string()),
    ("revision", pa.string()),  # the branch committed to
    ("private", pa.bool_()),
    ("commit_id", pa.string()),  # the Hub's commit id (null for --dry-run)
    ("commit_url", pa.string()),
    ("endpoint", pa.string()),  # the Hub endpoint (HF_ENDPOINT), so a stand-in or mirror is told apart
    ("export_path", pa.string()),
    ("export_hash", pa.string()),  # the export's content hash: which data went where
    ("files", pa.string()),  # JSON list of the paths uploaded
    ("rows", pa.string()),  # JSON {split: rows}
    ("dry_run", pa.bool_()),
    ("published_at", pa.timestamp("us", tz="UTC")),
)

CALL_TABLES: dict[str, pa.Schema] = {
    "generation_calls": _schema(
        ("request_key", pa.string()),
        ("recipe", pa.string()),
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        *CALL_ACCOUNTING,
        ("status", pa.string()),  # ok | error; an error row is never a cache hit
        ("error", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ),
    "judge_calls": _schema(
        ("request_key", pa.string()),
        ("recipe", pa.string()),
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.string())),
        ("top_logprobs", TOP_LOGPROBS),
        *CALL_ACCOUNTING,
        ("status", pa.string()),
        ("error", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ),
}

# The reward-model labeler's calls: one scalar per (prompt, sample) conversation.
CALL_TABLES["reward_calls"] = _schema(
    ("request_key", pa.string()),
    ("recipe", pa.string()),
    ("run_id", pa.string()),
    ("model", pa.string()),
    ("reward", pa.float64()),
    *CALL_ACCOUNTING,
    ("status", pa.string()),
    ("error", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
)

STAGE_STATS = pa.struct(
    [
        ("stage", pa.string()),
        ("stage_key", pa.string()),
        ("skipped", pa.bool_()),
        ("rows", pa.int64()),
        ("model_calls", pa.int64()),
        ("cached_calls", pa.int64()),
        ("failed_calls", pa.int64()),
        ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()),
        ("retries", pa.int64()),
        ("cost_usd", pa.float64()),
        ("seconds", pa.float64()),
        ("notes", pa.string()),  # JSON: stage-specific counts (dropped ties, over-length samples, ...)
    ]
)

RUNS = _schema(
    ("run_id", pa.string()),
    ("recipe", pa.string()),
    ("recipe_hash", pa.string()),
    ("recipe_path", pa.string()),
    ("status", pa.string()),  # running | ok | incomplete | failed | interrupted
    ("round", pa.int64()),  # the self-improvement round (0: SFT); null outside rounds
    ("error", pa.string()),
    ("started_at", pa.timestamp("us", tz="UTC")),
    ("finished_at", pa.timestamp("us", tz="UTC")),
    ("seconds", pa.float64()),
    ("model_calls", pa.int64()),
    ("cached_calls", pa.int64()),
    ("failed_calls", pa.int64()),
    ("tokens_in", pa.int64()),
    ("tokens_out", pa.int64()),
    ("retries", pa.int64()),  # requests repeated after transient failures (HTTP backends)
    ("cost_usd", pa.float64()),  # summed price of priced calls; null when none had a known price
    ("versions", pa.string()),  # JSON: python, factory, torch, transformers, ... and the git revision
    ("stages", pa.list_(STAGE_STATS)),
)

ALL_TABLES: dict[str, pa.Schema] = {**STAGE_TABLES, **CALL_TABLES, "runs": RUNS}
