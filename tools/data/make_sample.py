"""Build the bundled demo sample from MovieLens latest-small (../shared/data/ml-latest-small).

The sample keeps the most-rated movies and a seeded random set of users with enough ratings among them,
so `make demo` shows real metrics in a few minutes on 2 cores. GroupLens' README (the licence) is copied
alongside, as its terms require.

Usage: python tools/data/make_sample.py [SOURCE_DIR] [--movies 1500] [--users 300]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "twostage" / "datasets" / "sample"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", nargs="?", default=str(ROOT.parent / "shared" / "data" / "ml-latest-small"))
    parser.add_argument("--movies", type=int, default=1500)
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--min-ratings", type=int, default=20)
    args = parser.parse_args()
    src = Path(args.source)
    TARGET.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SELECT setseed(0.42)")
    # 1. the most-rated movies
    con.execute(
        "CREATE TABLE keep_movies AS SELECT CAST(movieId AS VARCHAR) AS movieId FROM read_csv(?) GROUP BY 1 ORDER BY count(*) DESC, movieId LIMIT ?",
        [str(src / "ratings.csv"), args.movies],
    )
    # 2. a seeded random sample of users with enough ratings among them
    con.execute(
        """CREATE TABLE keep_users AS
           SELECT CAST(userId AS VARCHAR) AS userId FROM read_csv(?) WHERE CAST(movieId AS VARCHAR) IN (SELECT movieId FROM keep_movies)
           GROUP BY 1 HAVING count(*) >= ? ORDER BY hash(CAST(userId AS VARCHAR) || 'twostage') LIMIT ?""",
        [str(src / "ratings.csv"), args.min_ratings, args.users],
    )
    # 3. write the three files, same columns and order as the original
    for name, key_users in (("ratings.csv", True), ("tags.csv", True), ("movies.csv", False)):
        where = "movieId IN (SELECT movieId FROM keep_movies)"
        if key_users:
            where += " AND userId IN (SELECT userId FROM keep_users)"
        con.execute(
            f"COPY (SELECT * FROM read_csv(?, all_varchar = true) WHERE {where}) TO '{TARGET / name}' (HEADER, DELIMITER ',')",
            [str(src / name)],
        )
    shutil.copy(src / "README.txt", TARGET / "README.txt")
    for name in ("movies.csv", "ratings.csv", "tags.csv"):
        rows = con.execute("SELECT count(*) FROM read_csv(?)", [str(TARGET / name)]).fetchone()[0]
        print(f"{name}: {rows} rows")


if __name__ == "__main__":
    main()
