"""The cohort table (BIDS participants.tsv in spirit): reading, validation before any work,
and subject-level splits.

Columns: participant_id, [session_id], path (one sequence) or path_<SEQ> (one per sequence in
data.sequences), label, age, sex, [mask_path], [split]. Paths are relative to the table's
folder (absolute paths are kept). Validation reports every bad row at once, so a user with a
large cohort fixes the table in one go instead of one error per run.
"""

from __future__ import annotations

import collections
import dataclasses
import io as _io
import math
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from synthmri_jax.utils.errors import UserInputError
from synthmri_jax.data import nifti
from synthmri_jax.data.cache import SPLITS
from synthmri_jax.utils import io

REQUIRED_COLUMNS = ("participant_id", "label", "age", "sex")
SEX_VALUES = {"m": "M", "male": "M", "f": "F", "female": "F"}
AGE_RANGE = (0.0, 130.0)
# Mask and image grids agree when their affines differ by less than this (mm): float32
# sform storage alone makes last-digit differences.
AFFINE_TOLERANCE_MM = 1e-3
BAD_FILES_COLUMNS = ("line", "participant_id", "session_id", "file", "problem")


def as_list(value: Any) -> list[str]:
  """'T1w,FLAIR' or ('T1w', 'FLAIR') -> ['T1w', 'FLAIR']: config fields may be either."""
  if isinstance(value, str):
    items = value.split(",")
  else:
    items = list(value)
  return [str(v).strip() for v in items if str(v).strip()]


def image_columns(sequences: Sequence[str]) -> list[str]:
  """Names of the per-sequence path columns in a normalised cohort frame."""
  return [f"path_{s}" for s in sequences]


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem with one row (line 0: the table itself)."""

  line: int
  participant_id: str
  session_id: str
  file: str
  problem: str

  def __str__(self) -> str:
    where = f"line {self.line}" if self.line else "table"
    if self.participant_id:
      where += f" ({self.participant_id}{'/' + self.session_id if self.session_id else ''})"
    return f"{where}: {self.file}: {self.problem}"


class CohortError(UserInputError, ValueError):
  """Everything wrong with a cohort table, listed at once."""

  def __init__(self, table: str, problems: Sequence[Problem], skippable: bool = True):
    self.table = table
    self.problems = list(problems)
    rows = len({p.line for p in self.problems if p.line})
    head = f"cohort table {table}: {len(self.problems)} problem(s)"
    if rows:
      head += f" in {rows} row(s)"
    if skippable and rows:
      head += "; fix them, or set data.on_bad_file=skip to drop those rows"
    super().__init__(head + ":\n" + "\n".join("  " + str(p) for p in self.problems))


# ------------------------------------------------------------------------------ reading

def read_cohort(table_path: str, sequences: Sequence[str]) -> pd.DataFrame:
  """Reads the table into a normalised frame: line (1-based, header = 1), participant_id,
  session_id, label, age, sex, split (raw strings), mask_path and path_<SEQ> (absolute, '' when
  empty). Raises CohortError when the table is missing, unreadable or lacks required columns."""
  table_path = os.path.abspath(table_path)
  if not os.path.isfile(table_path):
    raise CohortError(table_path, [Problem(0, "", "", table_path, "cohort table not found")], skippable=False)
  ext = os.path.splitext(table_path)[1].lower()
  sep = {".tsv": "\t", ".txt": "\t", ".csv": ","}.get(ext)
  try:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    raw = pd.read_csv(table_path, sep=sep, engine="python" if sep is None else "c", dtype=str,
                      keep_default_na=False, na_filter=False, encoding="utf-8-sig")
  except Exception as e:
    raise CohortError(table_path, [Problem(0, "", "", table_path, f"unreadable table ({type(e).__name__}: {e})")],
                      skippable=False) from None
  raw.columns = [str(c).strip() for c in raw.columns]
  columns = set(raw.columns)
  source: dict[str, str] = {}
  missing = [c for c in REQUIRED_COLUMNS if c not in columns]
  for seq in sequences:
    if f"path_{seq}" in columns:
      source[seq] = f"path_{seq}"
    elif len(sequences) == 1 and "path" in columns:
      source[seq] = "path"
    else:
      missing.append(f"path_{seq}" + (" (or path)" if len(sequences) == 1 else ""))
  if missing:
    raise CohortError(table_path, [Problem(0, "", "", table_path,
                                           f"missing required column(s): {', '.join(missing)} "
                                           f"(found: {', '.join(raw.columns) or 'none'})")], skippable=False)
  root = os.path.dirname(table_path)

  def col(name: str) -> pd.Series:
    return raw[name].astype(str).str.strip() if name in columns else pd.Series([""] * len(raw), dtype=str)

  def resolve(p: str) -> str:
    p = p.strip()
    if not p:
      return ""
    p = os.path.expanduser(p)
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p))

  df = pd.DataFrame({
      "line": np.arange(len(raw), dtype=int) + 2,
      "participant_id": col("participant_id"),
      "session_id": col("session_id"),
      "label": col("label"),
      "age": col("age"),
      "sex": col("sex"),
      "split": col("split"),
      "mask_path": col("mask_path").map(resolve),
  })
  for seq, name in zip(sequences, image_columns(sequences)):
    df[name] = col(source[seq]).map(resolve)
  df.attrs["table"] = table_path
  df.attrs["sequences"] = list(sequences)
  return df


# ------------------------------------------------------------------------------ validation

def parse_age(raw: str) -> float | None:
  try:
    age = float(raw)
  except ValueError:
    return None
  return age if math.isfinite(age) and AGE_RANGE[0] <= age <= AGE_RANGE[1] else None


def check_rows(df: pd.DataFrame, labels: Sequence[str]) -> list[Problem]:
  """Problems visible from the table and the file system alone (no voxel is read)."""
  table = df.attrs.get("table", "<table>")
  cols = image_columns(df.attrs["sequences"])
  problems: list[Problem] = []
  uses: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
  ids: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
  splits: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
  files: dict[int, str] = {}    # the file that names a row in messages: its first image
  for r in df.itertuples(index=False):
    r = r._asdict()
    line, pid, ses = r["line"], r["participant_id"], r["session_id"]
    file = files[line] = next((r[c] for c in cols if r[c]), table)

    def bad(problem: str, f: str = file) -> None:
      problems.append(Problem(line, pid, ses, f, problem))

    if not pid:
      bad("empty participant_id")
    if r["label"] not in labels:
      bad(f"unknown label {r['label']!r}; allowed (data.labels): {', '.join(labels)}")
    if parse_age(r["age"]) is None:
      bad(f"bad age {r['age']!r}; need a number of years in [{AGE_RANGE[0]:g}, {AGE_RANGE[1]:g}]")
    if r["sex"].lower() not in SEX_VALUES:
      bad(f"bad sex {r['sex']!r}; need M or F (male/female)")
    if r["split"] and r["split"] not in SPLITS:
      bad(f"bad split {r['split']!r}; known: {', '.join(SPLITS)} (or empty: assigned by prepare)")
    for c in cols + ["mask_path"]:
      path = r[c]
      if not path:
        if c != "mask_path":
          bad(f"empty {c}", table)
        continue
      uses[path].append((line, c))
      if not os.path.exists(path):
        bad(f"file not found ({c})", path)
      elif not os.path.isfile(path):
        bad(f"not a file ({c})", path)
    ids[(pid, ses)].append(line)
    if r["split"] in SPLITS:
      splits[pid].append((line, r["split"]))

  by_line = {line: (pid, ses) for (pid, ses), lines in ids.items() for line in lines}
  for path, used in uses.items():
    if len(used) > 1:
      for line, c in used:
        others = "; ".join(f"line {ln} {cc}" for ln, cc in used if (ln, cc) != (line, c))
        problems.append(Problem(line, *by_line[line], path, f"duplicate path ({c}): also used by {others}"))
  for (pid, ses), lines in ids.items():
    if len(lines) > 1 and pid:
      what = "participant_id/session_id" if ses else "participant_id (add a session_id column to tell sessions apart)"
      for line in lines:
        others = ", ".join(str(ln) for ln in lines if ln != line)
        problems.append(Problem(line, pid, ses, files[line], f"duplicate {what}: also on line(s) {others}"))
  for pid, assigned in splits.items():
    if len({s for _, s in assigned}) > 1:
      detail = ", ".join(f"{s} on line {ln}" for ln, s in assigned)
      for line, _ in assigned:
        problems.append(Problem(line, pid, by_line[line][1], files[line],
                                f"participant's sessions are in different splits ({detail}); "
                                "a participant belongs to exactly one split"))
  return problems


def inspect_file(path: str, kind: str) -> dict[str, Any]:
  """Reads one file fully and reports what is wrong with it as a volume (kind 'image') or a
  label map (kind 'mask'); also returns the raw grid for the mask-vs-image check. Top-level so
  worker processes can run it."""
  out: dict[str, Any] = {"shape": None, "affine": None, "problems": []}
  try:
    data, affine = nifti.load_volume(path)
  except nifti.VolumeError as e:
    out["problems"].append(e.problem)
    return out
  out["shape"], out["affine"] = list(data.shape), affine.tolist()
  finite = np.isfinite(data)
  if not finite.all():
    n_nan = int(np.isnan(data).sum())
    out["problems"].append(f"{n_nan} NaN and {int((~finite).sum()) - n_nan} Inf voxels")
    return out
  if kind == "mask":
    if np.any(data != np.rint(data)):
      out["problems"].append("mask has non-integer values; a label map of integers 0..255 is needed")
    elif data.min() < 0 or data.max() > 255:
      out["problems"].append(f"mask labels outside 0..255 (min {data.min():g}, max {data.max():g})")
  else:
    fg = int(nifti.foreground_mask(data, clean=False).sum())
    if fg < nifti.min_foreground_voxels(data.shape):
      out["problems"].append(f"empty foreground ({fg} voxels above background; blank or constant volume?)")
  return out


def _stat_key(path: str) -> list[int]:
  st = os.stat(path)
  return [int(st.st_size), int(st.st_mtime_ns)]


def inspect_files(items: Iterable[tuple[str, str]], map_fn: Callable = map,
                  memo: dict[str, Any] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
  """inspect_file over (path, kind) pairs, via `map_fn` (e.g. a process pool's map).

  `memo` (kept by the caller across runs) skips files whose size and mtime are unchanged since
  they were last inspected: a resumed `prepare` does not re-read a large cohort to validate it.
  """
  memo = {} if memo is None else memo
  results: dict[tuple[str, str], dict[str, Any]] = {}
  todo = []
  for path, kind in dict.fromkeys(items):
    key = f"{kind}|{path}"
    hit = memo.get(key)
    if hit is not None and hit.get("stat") == _stat_key(path):
      results[(path, kind)] = hit["info"]
    else:
      todo.append((path, kind))
  for (path, kind), info in zip(todo, map_fn(inspect_file, [p for p, _ in todo], [k for _, k in todo])):
    results[(path, kind)] = info
    memo[f"{kind}|{path}"] = {"stat": _stat_key(path), "info": info}
  return results


def validate(df: pd.DataFrame, labels: Sequence[str], map_fn: Callable = map,
             memo: dict[str, Any] | None = None) -> tuple[pd.DataFrame, list[Problem]]:
  """Every check at once. Returns (good rows, problems); the good rows get typed age, sex
  (M/F) and label_index. Nothing is raised here: the caller decides between error and skip."""
  labels = list(labels)
  cols = image_columns(df.attrs["sequences"])
  problems = check_rows(df, labels)
  items = []
  for r in df.itertuples(index=False):
    r = r._asdict()
    items += [(r[c], "image") for c in cols if r[c] and os.path.isfile(r[c])]
    if r["mask_path"] and os.path.isfile(r["mask_path"]):
      items.append((r["mask_path"], "mask"))
  info = inspect_files(items, map_fn=map_fn, memo=memo)
  for r in df.itertuples(index=False):
    r = r._asdict()
    who = (r["line"], r["participant_id"], r["session_id"])
    for c, kind in [(c, "image") for c in cols] + [("mask_path", "mask")]:
      got = info.get((r[c], kind))
      for p in (got or {}).get("problems", []):
        problems.append(Problem(*who, r[c], p))
    image, mask = info.get((r[cols[0]], "image")), info.get((r["mask_path"], "mask"))
    if image and mask and image["shape"] and mask["shape"] and not image["problems"]:
      if image["shape"] != mask["shape"]:
        problems.append(Problem(*who, r["mask_path"], f"mask grid {tuple(mask['shape'])} does not match its image "
                                                      f"{r[cols[0]]} {tuple(image['shape'])}"))
      else:
        diff = float(np.abs(np.asarray(image["affine"]) - np.asarray(mask["affine"])).max())
        if diff > AFFINE_TOLERANCE_MM:
          problems.append(Problem(*who, r["mask_path"], f"mask affine differs from its image {r[cols[0]]} "
                                                        f"(max difference {diff:.4g} mm)"))
  problems.sort(key=lambda p: (p.line, p.file, p.problem))
  bad_lines = {p.line for p in problems}
  good = df[~df["line"].isin(bad_lines)].copy()
  good["age"] = good["age"].map(parse_age).astype(float)
  good["sex"] = good["sex"].str.lower().map(SEX_VALUES)
  good["label_index"] = good["label"].map({name: i for i, name in enumerate(labels)}).astype(int)
  good = good.reset_index(drop=True)
  good.attrs.update(df.attrs)
  return good, problems


def write_bad_files(path: str, problems: Sequence[Problem]) -> None:
  """The skipped rows and why, as TSV (atomic)."""
  frame = pd.DataFrame([dataclasses.asdict(p) for p in problems], columns=list(BAD_FILES_COLUMNS))
  buf = _io.StringIO()
  frame.to_csv(buf, sep="\t", index=False)
  io.write_text_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------ splits

def split_fractions(fractions: Any) -> dict[str, float]:
  """{split: fraction} from a dict/ConfigDict; each in [0, 1], summing to 1."""
  got = dict(fractions.items() if hasattr(fractions, "items") else fractions)
  unknown = sorted(set(got) - set(SPLITS))
  if unknown:
    raise ValueError(f"data.split_fractions: unknown split(s) {unknown}; known: {', '.join(SPLITS)}")
  out = {s: float(got.get(s, 0.0)) for s in SPLITS}
  if any(not (0.0 <= f <= 1.0) for f in out.values()) or abs(sum(out.values()) - 1.0) > 1e-6:
    raise ValueError(f"data.split_fractions must be in [0, 1] and sum to 1; got {out}")
  return out


def _allocate(n: int, fractions: dict[str, float], carry: np.ndarray) -> list[int]:
  """n items of one stratum -> counts per split, summing to n.

  Largest remainder, where the remainder includes `carry` (what earlier strata were short of
  or over their ideal share, updated in place): small strata then do not all round the same
  way, which would leave e.g. `val` empty in a small cohort.
  """
  ideal = np.array([fractions[s] * n for s in SPLITS])
  counts = np.floor(ideal).astype(int)
  order = np.argsort(-(carry + ideal - counts), kind="stable")
  for i in order[: n - counts.sum()]:
    counts[i] += 1
  carry += ideal - counts
  return counts.tolist()


def assign_splits(df: pd.DataFrame, fractions: Any, seed: int) -> pd.DataFrame:
  """Subject-level, label-stratified, seeded splits.

  All rows of a participant (several sessions) get one split. A split already in the table is
  kept for its participant (check_rows has made sure it is consistent); the others are shuffled
  per label with a generator seeded by (seed, label index) and cut by data.split_fractions
  (a participant's label: their most frequent one, e.g. for a CN -> AD converter).
  The result depends on the set of participants, not on the order of the table's rows.
  """
  fr = split_fractions(fractions)
  out = df.copy()
  preset = out[out["split"] != ""].groupby("participant_id")["split"].first().to_dict()
  free = out[~out["participant_id"].isin(list(preset))]
  # A participant's stratum: their most frequent label (ties: lowest label index).
  strata = (free.groupby("participant_id")["label_index"]
            .agg(lambda s: int(s.value_counts().sort_index().idxmax())))
  chosen = dict(preset)
  carry = np.zeros(len(SPLITS))
  for k in sorted(set(strata.tolist())):
    members = sorted(strata.index[strata == k].tolist())
    rng = np.random.default_rng([int(seed), int(k)])
    members = [members[i] for i in rng.permutation(len(members))]
    start = 0
    for split, count in zip(SPLITS, _allocate(len(members), fr, carry)):
      for pid in members[start:start + count]:
        chosen[pid] = split
      start += count
  out["split"] = out["participant_id"].map(chosen)
  return out
