"""TPC-H benchmark: the 22 queries in Millstream's Dataset API against DuckDB, Polars and
PySpark on the same Parquet files, at the same parallelism, warm and cold.

Usage (from the repository root):

    python benchmarks/tpch.py                                # SF 1, every engine
    python benchmarks/tpch.py --sf 10 --queries 1,3,5 --engines duckdb,millstream
    python benchmarks/tpch.py --engines duckdb,polars,pyspark --timeout 300

The data is generated with ``tpchgen-cli`` into ``benchmarks/data/tpch-sf<N>/``; the
reference answers are DuckDB's on the official query texts (``tpch_queries/``) and are
cached beside it. Every (query, engine) runs in its own subprocess (``querybench.py``).

The Millstream queries below are written the way the SQL reads: the tables of the FROM
clause joined on the equalities of the WHERE clause, then the rest of the WHERE clause as
one filter; subqueries become datasets of their own (IN / EXISTS a semi join, NOT IN /
NOT EXISTS an anti join, a scalar subquery a one-row dataset cross-joined and compared in
the filter, a correlated one grouped by its correlation columns and joined on them).
Nothing is placed under a join by hand: that is the optimizer's job. A query that needs a
feature the API does not have yet is reported as unsupported, naming it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DATA_DIR,
    INSTALL_HINT,
    RESULTS_DIR,
    environment_info,
    module_available,
    parse_size,
    warm_page_cache,
    write_results,
)
from querybench import (  # noqa: E402
    Unsupported,
    add_common_args,
    add_query_worker_args,
    cells_json,
    print_report,
    query_worker_main,
    report_saved,
    run_matrix,
)
from tpch_peers import (  # noqa: E402
    QUERY_NAMES,
    TABLES,
    DuckDBEngine,
    PolarsEngine,
    SparkEngine,
    ensure_answers,
    ensure_data,
    make_check,
    plain_strings_copy,
    sql_text,
)

try:
    import millstream as ms
except ImportError:  # the harness runs without it; the millstream worker reports it
    ms = None  # type: ignore[assignment]

ALL_ENGINES = ("duckdb", "polars", "pyspark", "millstream", "millstream-sql")
REFERENCE = "duckdb"


# =========================================================================== Millstream


def col(name: str) -> Any:
    """``ms.col``."""
    return ms.col(name)


def date(text: str) -> Any:
    """A SQL date literal."""
    return ms.lit(_dt.date.fromisoformat(text))


def dec(text: str) -> Decimal:
    """A SQL decimal literal such as 0.05 (exact, not a float)."""
    return Decimal(text)


def alias(ds: Any, name: str) -> Any:
    """A table under another name, as SQL's ``nation n1``: columns ``n_x`` become ``n1_x``."""
    return ds.rename({c: f"{name}_{c.split('_', 1)[1]}" for c in ds.columns})


def revenue() -> Any:
    """``l_extendedprice * (1 - l_discount)``."""
    return col("l_extendedprice") * (1 - col("l_discount"))


class Tables:
    """The TPC-H tables as Millstream datasets: every reference is a new scan, as every
    table in a FROM clause is."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = data_dir

    def __getattr__(self, name: str) -> Any:
        if name not in TABLES:
            raise AttributeError(name)
        return ms.read_parquet(str(self._dir / f"{name}.parquet"))


def q1(t: Tables) -> Any:
    """Pricing Summary Report."""
    return (t.lineitem
            .filter(col("l_shipdate") <= ms.lit(_dt.date(1998, 12, 1) - _dt.timedelta(days=90)))
            .group_by("l_returnflag", "l_linestatus")
            .agg(ms.sum("l_quantity").alias("sum_qty"),
                 ms.sum("l_extendedprice").alias("sum_base_price"),
                 ms.sum(revenue()).alias("sum_disc_price"),
                 ms.sum(revenue() * (1 + col("l_tax"))).alias("sum_charge"),
                 ms.mean("l_quantity").alias("avg_qty"),
                 ms.mean("l_extendedprice").alias("avg_price"),
                 ms.mean("l_discount").alias("avg_disc"),
                 ms.count().alias("count_order"))
            .sort(["l_returnflag", "l_linestatus"]))


def q2(t: Tables) -> Any:
    """Minimum Cost Supplier."""
    min_cost = (t.partsupp
                .join(t.supplier, left_on="ps_suppkey", right_on="s_suppkey")
                .join(t.nation, left_on="s_nationkey", right_on="n_nationkey")
                .join(t.region, left_on="n_regionkey", right_on="r_regionkey")
                .filter(col("r_name") == "EUROPE")
                .group_by("ps_partkey")
                .agg(ms.min("ps_supplycost").alias("min_supplycost"))
                .rename({"ps_partkey": "min_partkey"}))
    return (t.part
            .join(t.partsupp, left_on="p_partkey", right_on="ps_partkey")
            .join(t.supplier, left_on="ps_suppkey", right_on="s_suppkey")
            .join(t.nation, left_on="s_nationkey", right_on="n_nationkey")
            .join(t.region, left_on="n_regionkey", right_on="r_regionkey")
            .join(min_cost, left_on="p_partkey", right_on="min_partkey")
            .filter((col("p_size") == 15) & col("p_type").str.ends_with("BRASS")
                    & (col("r_name") == "EUROPE")
                    & (col("ps_supplycost") == col("min_supplycost")))
            .select("s_acctbal", "s_name", "n_name", "p_partkey", "p_mfgr", "s_address",
                    "s_phone", "s_comment")
            .sort(["s_acctbal", "n_name", "s_name", "p_partkey"],
                  descending=[True, False, False, False])
            .limit(100))


def q3(t: Tables) -> Any:
    """Shipping Priority."""
    return (t.customer
            .join(t.orders, left_on="c_custkey", right_on="o_custkey")
            .join(t.lineitem, left_on="o_orderkey", right_on="l_orderkey")
            .filter((col("c_mktsegment") == "BUILDING")
                    & (col("o_orderdate") < date("1995-03-15"))
                    & (col("l_shipdate") > date("1995-03-15")))
            .group_by("l_orderkey", "o_orderdate", "o_shippriority")
            .agg(ms.sum(revenue()).alias("revenue"))
            .select("l_orderkey", "revenue", "o_orderdate", "o_shippriority")
            .sort(["revenue", "o_orderdate"], descending=[True, False])
            .limit(10))


def q4(t: Tables) -> Any:
    """Order Priority Checking."""
    late = t.lineitem.filter(col("l_commitdate") < col("l_receiptdate"))
    return (t.orders
            .join(late, left_on="o_orderkey", right_on="l_orderkey", how="semi")
            .filter((col("o_orderdate") >= date("1993-07-01"))
                    & (col("o_orderdate") < date("1993-10-01")))
            .group_by("o_orderpriority")
            .agg(ms.count().alias("order_count"))
            .sort("o_orderpriority"))


def q5(t: Tables) -> Any:
    """Local Supplier Volume."""
    return (t.customer
            .join(t.orders, left_on="c_custkey", right_on="o_custkey")
            .join(t.lineitem, left_on="o_orderkey", right_on="l_orderkey")
            .join(t.supplier, left_on=["l_suppkey", "c_nationkey"],
                  right_on=["s_suppkey", "s_nationkey"])
            .join(t.nation, left_on="s_nationkey", right_on="n_nationkey")
            .join(t.region, left_on="n_regionkey", right_on="r_regionkey")
            .filter((col("r_name") == "ASIA")
                    & (col("o_orderdate") >= date("1994-01-01"))
                    & (col("o_orderdate") < date("1995-01-01")))
            .group_by("n_name")
            .agg(ms.sum(revenue()).alias("revenue"))
            .sort("revenue", descending=True))


def q6(t: Tables) -> Any:
    """Forecasting Revenue Change."""
    return (t.lineitem
            .filter((col("l_shipdate") >= date("1994-01-01"))
                    & (col("l_shipdate") < date("1995-01-01"))
                    & col("l_discount").between(dec("0.05"), dec("0.07"))
                    & (col("l_quantity") < 24))
            .agg(ms.sum(col("l_extendedprice") * col("l_discount")).alias("revenue")))


def q7(t: Tables) -> Any:
    """Volume Shipping."""
    n1, n2 = alias(t.nation, "n1"), alias(t.nation, "n2")
    shipping = (t.supplier
                .join(t.lineitem, left_on="s_suppkey", right_on="l_suppkey")
                .join(t.orders, left_on="l_orderkey", right_on="o_orderkey")
                .join(t.customer, left_on="o_custkey", right_on="c_custkey")
                .join(n1, left_on="s_nationkey", right_on="n1_nationkey")
                .join(n2, left_on="c_nationkey", right_on="n2_nationkey")
                .filter((((col("n1_name") == "FRANCE") & (col("n2_name") == "GERMANY"))
                         | ((col("n1_name") == "GERMANY") & (col("n2_name") == "FRANCE")))
                        & col("l_shipdate").between(date("1995-01-01"), date("1996-12-31")))
                .select(col("n1_name").alias("supp_nation"), col("n2_name").alias("cust_nation"),
                        col("l_shipdate").dt.year().alias("l_year"), revenue().alias("volume")))
    return (shipping
            .group_by("supp_nation", "cust_nation", "l_year")
            .agg(ms.sum("volume").alias("revenue"))
            .sort(["supp_nation", "cust_nation", "l_year"]))


def q8(t: Tables) -> Any:
    """National Market Share."""
    n1, n2 = alias(t.nation, "n1"), alias(t.nation, "n2")
    all_nations = (t.part
                   .join(t.lineitem, left_on="p_partkey", right_on="l_partkey")
                   .join(t.supplier, left_on="l_suppkey", right_on="s_suppkey")
                   .join(t.orders, left_on="l_orderkey", right_on="o_orderkey")
                   .join(t.customer, left_on="o_custkey", right_on="c_custkey")
                   .join(n1, left_on="c_nationkey", right_on="n1_nationkey")
                   .join(t.region, left_on="n1_regionkey", right_on="r_regionkey")
                   .join(n2, left_on="s_nationkey", right_on="n2_nationkey")
                   .filter((col("r_name") == "AMERICA")
                           & col("o_orderdate").between(date("1995-01-01"), date("1996-12-31"))
                           & (col("p_type") == "ECONOMY ANODIZED STEEL"))
                   .select(col("o_orderdate").dt.year().alias("o_year"),
                           revenue().alias("volume"), col("n2_name").alias("nation")))
    brazil = ms.when(col("nation") == "BRAZIL", col("volume")).otherwise(0)
    return (all_nations
            .group_by("o_year")
            .agg((ms.sum(brazil) / ms.sum("volume")).alias("mkt_share"))
            .sort("o_year"))


def q9(t: Tables) -> Any:
    """Product Type Profit Measure."""
    profit = (t.part
              .join(t.lineitem, left_on="p_partkey", right_on="l_partkey")
              .join(t.supplier, left_on="l_suppkey", right_on="s_suppkey")
              .join(t.partsupp, left_on=["l_suppkey", "l_partkey"],
                    right_on=["ps_suppkey", "ps_partkey"])
              .join(t.orders, left_on="l_orderkey", right_on="o_orderkey")
              .join(t.nation, left_on="s_nationkey", right_on="n_nationkey")
              .filter(col("p_name").str.contains("green"))
              .select(col("n_name").alias("nation"),
                      col("o_orderdate").dt.year().alias("o_year"),
                      (revenue() - col("ps_supplycost") * col("l_quantity")).alias("amount")))
    return (profit
            .group_by("nation", "o_year")
            .agg(ms.sum("amount").alias("sum_profit"))
            .sort(["nation", "o_year"], descending=[False, True]))


def q10(t: Tables) -> Any:
    """Returned Item Reporting."""
    return (t.customer
            .join(t.orders, left_on="c_custkey", right_on="o_custkey")
            .join(t.lineitem, left_on="o_orderkey", right_on="l_orderkey")
            .join(t.nation, left_on="c_nationkey", right_on="n_nationkey")
            .filter((col("o_orderdate") >= date("1993-10-01"))
                    & (col("o_orderdate") < date("1994-01-01"))
                    & (col("l_returnflag") == "R"))
            .group_by("c_custkey", "c_name", "c_acctbal", "c_phone", "n_name", "c_address",
                      "c_comment")
            .agg(ms.sum(revenue()).alias("revenue"))
            .select("c_custkey", "c_name", "revenue", "c_acctbal", "n_name", "c_address",
                    "c_phone", "c_comment")
            .sort("revenue", descending=True)
            .limit(20))


def q11(t: Tables) -> Any:
    """Important Stock Identification."""
    def german_stock() -> Any:
        return (t.partsupp
                .join(t.supplier, left_on="ps_suppkey", right_on="s_suppkey")
                .join(t.nation, left_on="s_nationkey", right_on="n_nationkey")
                .filter(col("n_name") == "GERMANY"))

    stock_value = col("ps_supplycost") * col("ps_availqty")
    threshold = german_stock().agg((ms.sum(stock_value) * dec("0.0001")).alias("threshold"))
    return (german_stock()
            .group_by("ps_partkey")
            .agg(ms.sum(stock_value).alias("value"))
            .cross_join(threshold)
            .filter(col("value") > col("threshold"))
            .select("ps_partkey", "value")
            .sort("value", descending=True))


def q12(t: Tables) -> Any:
    """Shipping Modes and Order Priority."""
    urgent = (col("o_orderpriority") == "1-URGENT") | (col("o_orderpriority") == "2-HIGH")
    not_urgent = (col("o_orderpriority") != "1-URGENT") & (col("o_orderpriority") != "2-HIGH")
    return (t.orders
            .join(t.lineitem, left_on="o_orderkey", right_on="l_orderkey")
            .filter(col("l_shipmode").is_in(["MAIL", "SHIP"])
                    & (col("l_commitdate") < col("l_receiptdate"))
                    & (col("l_shipdate") < col("l_commitdate"))
                    & (col("l_receiptdate") >= date("1994-01-01"))
                    & (col("l_receiptdate") < date("1995-01-01")))
            .group_by("l_shipmode")
            .agg(ms.sum(ms.when(urgent, 1).otherwise(0)).alias("high_line_count"),
                 ms.sum(ms.when(not_urgent, 1).otherwise(0)).alias("low_line_count"))
            .sort("l_shipmode"))


def q13(t: Tables) -> Any:
    """Customer Distribution."""
    c_orders = (t.customer
                .join(t.orders, left_on="c_custkey", right_on="o_custkey", how="left",
                      condition=~col("o_comment").str.contains("special.*requests", regex=True))
                .group_by("c_custkey")
                .agg(ms.count("o_orderkey").alias("c_count")))
    return (c_orders
            .group_by("c_count")
            .agg(ms.count().alias("custdist"))
            .sort(["custdist", "c_count"], descending=[True, True]))


def q14(t: Tables) -> Any:
    """Promotion Effect."""
    promo = ms.when(col("p_type").str.starts_with("PROMO"), revenue()).otherwise(0)
    return (t.lineitem
            .join(t.part, left_on="l_partkey", right_on="p_partkey")
            .filter((col("l_shipdate") >= date("1995-09-01"))
                    & (col("l_shipdate") < date("1995-10-01")))
            .agg((dec("100.00") * ms.sum(promo) / ms.sum(revenue())).alias("promo_revenue")))


def q15(t: Tables) -> Any:
    """Top Supplier."""
    revenue0 = (t.lineitem
                .filter((col("l_shipdate") >= date("1996-01-01"))
                        & (col("l_shipdate") < date("1996-04-01")))
                .group_by("l_suppkey")
                .agg(ms.sum(revenue()).alias("total_revenue"))
                .rename({"l_suppkey": "supplier_no"}))
    top = revenue0.agg(ms.max("total_revenue").alias("max_revenue"))
    return (t.supplier
            .join(revenue0, left_on="s_suppkey", right_on="supplier_no")
            .cross_join(top)
            .filter(col("total_revenue") == col("max_revenue"))
            .select("s_suppkey", "s_name", "s_address", "s_phone", "total_revenue")
            .sort("s_suppkey"))


def q16(t: Tables) -> Any:
    """Parts/Supplier Relationship."""
    complaints = t.supplier.filter(col("s_comment").str.contains("Customer.*Complaints",
                                                                 regex=True))
    return (t.partsupp
            .join(t.part, left_on="ps_partkey", right_on="p_partkey")
            .join(complaints, left_on="ps_suppkey", right_on="s_suppkey", how="anti")
            .filter((col("p_brand") != "Brand#45")
                    & ~col("p_type").str.starts_with("MEDIUM POLISHED")
                    & col("p_size").is_in([49, 14, 23, 45, 19, 3, 36, 9]))
            .group_by("p_brand", "p_type", "p_size")
            .agg(ms.count_distinct("ps_suppkey").alias("supplier_cnt"))
            .sort(["supplier_cnt", "p_brand", "p_type", "p_size"],
                  descending=[True, False, False, False]))


def q17(t: Tables) -> Any:
    """Small-Quantity-Order Revenue."""
    small = (t.lineitem
             .group_by("l_partkey")
             .agg((dec("0.2") * ms.mean("l_quantity")).alias("small_quantity"))
             .rename({"l_partkey": "small_partkey"}))
    return (t.lineitem
            .join(t.part, left_on="l_partkey", right_on="p_partkey")
            .join(small, left_on="p_partkey", right_on="small_partkey")
            .filter((col("p_brand") == "Brand#23") & (col("p_container") == "MED BOX")
                    & (col("l_quantity") < col("small_quantity")))
            .agg((ms.sum("l_extendedprice") / dec("7.0")).alias("avg_yearly")))


def q18(t: Tables) -> Any:
    """Large Volume Customer."""
    large = (t.lineitem
             .group_by("l_orderkey")
             .agg(ms.sum("l_quantity").alias("order_quantity"))
             .filter(col("order_quantity") > 300))
    return (t.customer
            .join(t.orders, left_on="c_custkey", right_on="o_custkey")
            .join(t.lineitem, left_on="o_orderkey", right_on="l_orderkey")
            .join(large, left_on="o_orderkey", right_on="l_orderkey", how="semi")
            .group_by("c_name", "c_custkey", "o_orderkey", "o_orderdate", "o_totalprice")
            .agg(ms.sum("l_quantity").alias("sum_qty"))
            .sort(["o_totalprice", "o_orderdate"], descending=[True, False])
            .limit(100))


def q19(t: Tables) -> Any:
    """Discounted Revenue."""
    def kind(brand: str, containers: list[str], low: int, size: int) -> Any:
        return ((col("p_brand") == brand) & col("p_container").is_in(containers)
                & (col("l_quantity") >= low) & (col("l_quantity") <= low + 10)
                & col("p_size").between(1, size)
                & col("l_shipmode").is_in(["AIR", "AIR REG"])
                & (col("l_shipinstruct") == "DELIVER IN PERSON"))

    return (t.lineitem
            .join(t.part, left_on="l_partkey", right_on="p_partkey")
            .filter(kind("Brand#12", ["SM CASE", "SM BOX", "SM PACK", "SM PKG"], 1, 5)
                    | kind("Brand#23", ["MED BAG", "MED BOX", "MED PKG", "MED PACK"], 10, 10)
                    | kind("Brand#34", ["LG CASE", "LG BOX", "LG PACK", "LG PKG"], 20, 15))
            .agg(ms.sum(revenue()).alias("revenue")))


def q20(t: Tables) -> Any:
    """Potential Part Promotion."""
    forest = t.part.filter(col("p_name").str.starts_with("forest"))
    shipped = (t.lineitem
               .filter((col("l_shipdate") >= date("1994-01-01"))
                       & (col("l_shipdate") < date("1995-01-01")))
               .group_by("l_partkey", "l_suppkey")
               .agg((dec("0.5") * ms.sum("l_quantity")).alias("half_quantity")))
    excess = (t.partsupp
              .join(forest, left_on="ps_partkey", right_on="p_partkey", how="semi")
              .join(shipped, left_on=["ps_partkey", "ps_suppkey"],
                    right_on=["l_partkey", "l_suppkey"])
              .filter(col("ps_availqty") > col("half_quantity")))
    return (t.supplier
            .join(t.nation, left_on="s_nationkey", right_on="n_nationkey")
            .join(excess, left_on="s_suppkey", right_on="ps_suppkey", how="semi")
            .filter(col("n_name") == "CANADA")
            .select("s_name", "s_address")
            .sort("s_name"))


def q21(t: Tables) -> Any:
    """Suppliers Who Kept Orders Waiting."""
    l2 = alias(t.lineitem, "l2")
    l3 = alias(t.lineitem, "l3").filter(col("l3_receiptdate") > col("l3_commitdate"))
    return (t.supplier
            .join(t.lineitem, left_on="s_suppkey", right_on="l_suppkey")
            .join(t.orders, left_on="l_orderkey", right_on="o_orderkey")
            .join(t.nation, left_on="s_nationkey", right_on="n_nationkey")
            .join(l2, left_on="l_orderkey", right_on="l2_orderkey", how="semi",
                  condition=col("l2_suppkey") != col("l_suppkey"))
            .join(l3, left_on="l_orderkey", right_on="l3_orderkey", how="anti",
                  condition=col("l3_suppkey") != col("l_suppkey"))
            .filter((col("o_orderstatus") == "F")
                    & (col("l_receiptdate") > col("l_commitdate"))
                    & (col("n_name") == "SAUDI ARABIA"))
            .group_by("s_name")
            .agg(ms.count().alias("numwait"))
            .sort(["numwait", "s_name"], descending=[True, False])
            .limit(100))


def q22(t: Tables) -> Any:
    """Global Sales Opportunity."""
    codes = ["13", "31", "23", "29", "30", "18", "17"]
    cntrycode = col("c_phone").str.slice(0, 2)
    average = (t.customer
               .filter((col("c_acctbal") > dec("0.00")) & cntrycode.is_in(codes))
               .agg(ms.mean("c_acctbal").alias("avg_acctbal")))
    custsale = (t.customer
                .join(t.orders, left_on="c_custkey", right_on="o_custkey", how="anti")
                .cross_join(average)
                .filter(cntrycode.is_in(codes) & (col("c_acctbal") > col("avg_acctbal")))
                .select(cntrycode.alias("cntrycode"), "c_acctbal"))
    return (custsale
            .group_by("cntrycode")
            .agg(ms.count().alias("numcust"), ms.sum("c_acctbal").alias("totacctbal"))
            .sort("cntrycode"))


QUERIES: dict[str, Callable[[Tables], Any]] = {f"q{i}": globals()[f"q{i}"] for i in range(1, 23)}


def missing_feature(exc: BaseException) -> str | None:
    """The API feature whose absence raised ``exc`` while a query was being written down
    (before it ran), or None when it is an ordinary error."""
    msg = str(exc)
    if isinstance(exc, AttributeError) and "cross_join" in msg:
        return "cross join (Dataset.cross_join)"
    if isinstance(exc, TypeError) and "'condition'" in msg:
        return "residual join conditions (join(..., condition=...))"
    if isinstance(exc, TypeError) and "AggExpr" in msg:
        return "expressions over aggregates inside agg (e.g. ms.sum(a) / ms.sum(b))"
    if type(exc).__name__ == "PlanError" and "agg()" in msg and "aggregate" in msg:
        return "expressions over aggregates inside agg (e.g. ms.sum(a) / ms.sum(b))"
    return None


# =========================================================================== engines


class MillstreamEngine:
    """Millstream's local runner: ``ms.init(parallelism=N)``, a query's ``to_arrow()``."""

    def __init__(self, data_dir: Path, parallelism: int, memory_limit: int | None) -> None:
        if ms is None:
            raise RuntimeError("millstream is not importable: pip install -e .")
        ms.init(parallelism=parallelism, memory_limit=memory_limit)
        self.tables = Tables(data_dir)
        self.details = {"parallelism": parallelism, "memory_limit": memory_limit,
                        "millstream": str(Path(ms.__file__).parent)}

    def run(self, query: str) -> Any:
        try:
            ds = QUERIES[query](self.tables)
        except Exception as e:  # noqa: BLE001
            feature = missing_feature(e)
            if feature:
                raise Unsupported(feature) from e
            raise
        return ds.to_arrow()

    def close(self) -> None:
        ms.shutdown()


class MillstreamSQLEngine(MillstreamEngine):
    """Millstream running the official query texts with ``ms.sql`` (tables registered as
    Parquet scans), the same optimizer and operators as the Dataset API form."""

    def __init__(self, data_dir: Path, parallelism: int, memory_limit: int | None) -> None:
        super().__init__(data_dir, parallelism, memory_limit)
        for name in TABLES:
            ms.register(name, ms.read_parquet(str(data_dir / f"{name}.parquet")))

    def run(self, query: str) -> Any:
        return ms.sql(sql_text(query)).to_arrow()


ENGINES: dict[str, Callable[[Path, int, int | None], Any]] = {
    "duckdb": DuckDBEngine, "polars": PolarsEngine, "pyspark": SparkEngine,
    "millstream": MillstreamEngine, "millstream-sql": MillstreamSQLEngine,
}
ENGINE_MODULES = {"duckdb": "duckdb", "polars": "polars", "pyspark": "pyspark",
                  "millstream": "millstream", "millstream-sql": "millstream"}


def make_engine(args: argparse.Namespace) -> Any:
    """Start the engine a worker was asked for."""
    mem = parse_size(args.memory_limit) if args.memory_limit else None
    return ENGINES[args.worker](Path(args.data_dir), args.parallelism, mem)


def availability(engine: str) -> str | None:
    """Why an engine cannot run here, or None."""
    mod = ENGINE_MODULES[engine]
    if engine in ("millstream", "millstream-sql"):
        src = Path(__file__).resolve().parent.parent / "src" / "millstream"
        return None if src.exists() or module_available(mod) else "millstream is not importable"
    if not module_available(mod):
        return f"{mod} is not installed: {INSTALL_HINT}"
    if engine == "pyspark" and not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        return "PySpark needs Java 17+ on PATH (or JAVA_HOME)"
    return None


# =========================================================================== harness


def parse_queries(text: str, p: argparse.ArgumentParser) -> list[str]:
    """``1,3,5`` or ``q1,q3`` or ``all`` -> query names."""
    if text.strip() == "all":
        return list(QUERY_NAMES)
    out = []
    for item in text.split(","):
        item = item.strip().lower().lstrip("q")
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 22:
            p.error(f"--queries: {item!r} is not a query number 1-22")
        out.append(f"q{int(item)}")
    return out


def harness_main(args: argparse.Namespace) -> int:
    """Generate the data, compute the reference answers, run the matrix, report."""
    data_dir = Path(args.data_dir)
    ensure_data(args.sf, data_dir, args.parallelism)
    if args.plain_strings:
        plain = Path(str(data_dir) + "-plain-strings")
        if not os.access(data_dir.parent, os.W_OK):
            plain = DATA_DIR / f"tpch-sf{args.sf}-plain-strings"
        plain_strings_copy(data_dir, plain)
        data_dir = plain
    if args.generate_only:
        return 0
    ensure_answers(args.sf, data_dir, args.queries, args.parallelism)
    for t in TABLES:
        warm_page_cache(data_dir / f"{t}.parquet")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / "logs" / f"tpch-sf{args.sf}-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"TPC-H SF {args.sf} ({data_dir}); engines {', '.join(args.engines)}; "
          f"parallelism {args.parallelism}; {args.runs} runs per process; "
          f"timeout {args.timeout:.0f} s per run", flush=True)
    cells = run_matrix(Path(__file__).resolve(), args.queries, args.engines, args, log_dir,
                       make_check(args.sf, data_dir), availability,
                       extra=["--data-dir", str(data_dir), "--sf", str(args.sf)])
    engines = args.engines
    reference = REFERENCE if REFERENCE in engines else engines[0]
    labels = [q.upper() for q in args.queries]
    for c in cells:
        c.query = c.query.upper()
    summary = print_report(cells, labels, engines, reference, f"TPC-H SF {args.sf}")
    payload = {
        "benchmark": "tpch",
        "timestamp": stamp,
        "scale_factor": args.sf,
        "data_dir": str(data_dir),
        "plain_strings": bool(args.plain_strings),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file", "query")},
        "reference": reference,
        "environment": environment_info(["millstream", "pyarrow", "polars", "duckdb",
                                         "pyspark", "tpchgen-cli", "psutil"]),
        "summary": summary,
        "cells": cells_json(cells, reference),
    }
    out = write_results(f"tpch-sf{args.sf}", payload)
    print(f"\nresults: {out}\nlogs:    {log_dir}")
    return 2 if any(c.status == "WRONG" for c in cells) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(
        description="TPC-H: Millstream vs DuckDB, Polars and PySpark on the same Parquet files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sf", type=int, default=1, help="scale factor (1 or 10)")
    p.add_argument("--data-dir", default=None,
                   help="the Parquet files (default: benchmarks/data/tpch-sf<N>, generated)")
    p.add_argument("--queries", default="all", help="e.g. 1,3,5 (default: all 22)")
    p.add_argument("--engines", default=",".join(ALL_ENGINES),
                   help=f"comma-separated, from: {', '.join(ALL_ENGINES)} (or 'all')")
    p.add_argument("--plain-strings", action="store_true",
                   help="run every engine on a copy of the data with string columns typed "
                        "string instead of tpchgen-cli's string_view (same values)")
    p.add_argument("--generate-only", action="store_true", help="only make the data")
    add_common_args(p, default_timeout=300.0)
    add_query_worker_args(p, ALL_ENGINES)
    args = p.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = str(DATA_DIR / f"tpch-sf{args.sf}")
    if not args.worker:
        args.queries = parse_queries(args.queries, p)
        names = ALL_ENGINES if args.engines.strip() == "all" else args.engines.split(",")
        args.engines = [e.strip() for e in names if e.strip()]
        bad = [e for e in args.engines if e not in ALL_ENGINES]
        if bad:
            p.error(f"unknown engine(s) {bad}; choose from {', '.join(ALL_ENGINES)}")
        if args.runs < 1 or args.parallelism < 1:
            p.error("--runs and --parallelism must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: the harness, or one (query, engine) with --worker."""
    args = parse_args(argv)
    if args.worker:
        return query_worker_main(make_engine, args)
    if args.report:
        return report_saved([Path(f) for f in args.report], ALL_ENGINES, REFERENCE,
                            f"TPC-H (saved: {len(args.report)} file(s))")
    return harness_main(args)


if __name__ == "__main__":
    sys.exit(main())
