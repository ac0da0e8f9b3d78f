"""Which benchmark queries look like a heading of the docs, and which do not.

The FAQ suite's queries are the FAQs' own headings, so LLM-free *heading* pairs (sdg.headings) train on queries
shaped like the test queries by construction. To report the gain on queries unlike any heading, this flags each
query with at least `--min-novel` (2) content words that occur in no heading of the benchmark's docs
("non-heading-like"); the rest are "heading-like". Content words: lower-cased word tokens, minus a short list of
function words (how, do, I, the, …), so "How do I retry a task?" is judged by "retry" and "task".

    python bench/heading_like_queries.py --suite /work/suite/built [--out bench/results/heading_like_queries.json]
    python bench/heading_like_queries.py --bench /work/suite/built/zsh-faq

Writes (or prints) per benchmark: the number of queries, of headings in its docs, and the ids of the
non-heading-like queries, which `non_heading_like(bench_dir)` also returns for use in a report.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedpipe.documents.reading import Document, discover, read_document  # noqa: E402

FUNCTION_WORDS = set("""
a an the and or but if of to in on at by for with from as into about over under between through is are was
were be been being am do does did doing have has had can could should would will shall may might must not no
i you he she it we they me my your our their its them us what which who whom whose when where why how whether
there here than then that this these those so also only just any some all each every s t don doesn isn
""".split())
_WORD = re.compile(r"[a-z0-9_]+")


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in FUNCTION_WORDS}


def heading_vocabulary(docs: Path, max_bytes: int = 20 * 1024 * 1024) -> tuple[set[str], int]:
    """The content words of every heading (every level, page titles too) of the documents, and how many headings."""
    files, _ = discover(docs)
    words: set[str] = set()
    headings: set[tuple[str, str]] = set()
    for path in files:
        doc = read_document(path, docs, max_bytes)
        if not isinstance(doc, Document):
            continue
        for section in doc.sections:
            for n, heading in enumerate(section.headings):
                if n == 0 and not section.named:
                    continue  # a file name, not a heading
                headings.add((doc.path, heading))
                words |= content_words(heading)
    return words, len(headings)


def novel_words(query: str, vocabulary: set[str]) -> list[str]:
    return sorted(content_words(query) - vocabulary)


def classify(bench: Path, min_novel: int = 2) -> dict:
    """{queries, headings, heading_like, non_heading_like, non_heading_like_ids, examples} for one benchmark."""
    vocabulary, n_headings = heading_vocabulary(bench / "docs")
    queries = [json.loads(line) for line in (bench / "beir" / "queries.jsonl").open() if line.strip()]
    novel = {q["_id"]: novel_words(q["text"], vocabulary) for q in queries}
    non_heading = sorted(q for q, w in novel.items() if len(w) >= min_novel)
    texts = {q["_id"]: q["text"] for q in queries}
    return {
        "queries": len(queries), "headings": n_headings, "min_novel_words": min_novel,
        "heading_like": len(queries) - len(non_heading), "non_heading_like": len(non_heading),
        "non_heading_like_ids": non_heading,
        "examples": {"heading_like": [texts[q] for q in texts if q not in set(non_heading)][:5],
                     "non_heading_like": [f"{texts[q]}  (novel: {', '.join(novel[q])})" for q in non_heading[:5]]},
    }


def non_heading_like(bench: Path, min_novel: int = 2) -> set[str]:
    """Ids of the benchmark's queries with at least `min_novel` content words in no heading of its docs."""
    return set(classify(bench, min_novel)["non_heading_like_ids"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--suite", type=Path, help="folder of benchmarks (each with docs/ and beir/)")
    where.add_argument("--bench", type=Path, help="one benchmark folder (docs/ and beir/)")
    ap.add_argument("--min-novel", type=int, default=2, help="content words in no heading for 'non-heading-like'")
    ap.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    args = ap.parse_args(argv)
    benches = [args.bench] if args.bench else sorted(
        p for p in args.suite.iterdir() if (p / "docs").is_dir() and (p / "beir").is_dir())
    result = {b.name: classify(b, args.min_novel) for b in benches}
    for name, r in result.items():
        print(f"{name}: {r['queries']} queries, {r['non_heading_like']} non-heading-like "
              f"(>= {r['min_novel_words']} content words in none of {r['headings']} headings), "
              f"{r['heading_like']} heading-like", file=sys.stderr)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
