"""The 22 TPC-H queries in Polars' lazy API, the Polars peer of ``tpch.py``.

Written as the SQL reads, like the Millstream queries: the FROM tables joined on the WHERE
equalities, then the rest of the WHERE as a filter; IN / EXISTS as semi joins, NOT IN /
NOT EXISTS as anti joins, scalar subqueries as one-row frames cross-joined, correlated
ones grouped by their correlation columns and joined. Where Polars has no construct for
the SQL's (a join condition beyond equalities: Q13's ON clause, Q21's EXISTS with ``<>``),
the usual Polars formulation is used and said so. Decimal quotients are taken in Float64,
as DuckDB does (Polars would keep the dividend's scale).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from typing import Any

import polars as pl

Frames = dict[str, pl.LazyFrame]
col = pl.col


def date(text: str) -> _dt.date:
    """A SQL date literal."""
    return _dt.date.fromisoformat(text)


def revenue() -> pl.Expr:
    """``l_extendedprice * (1 - l_discount)``."""
    return col("l_extendedprice") * (1 - col("l_discount"))


def alias(lf: pl.LazyFrame, name: str) -> pl.LazyFrame:
    """A table under another name, as SQL's ``nation n1``: columns ``n_x`` become ``n1_x``."""
    return lf.rename(lambda c: f"{name}_{c.split('_', 1)[1]}")


def q1(t: Frames) -> pl.LazyFrame:
    return (t["lineitem"]
            .filter(col("l_shipdate") <= date("1998-12-01") - _dt.timedelta(days=90))
            .group_by("l_returnflag", "l_linestatus")
            .agg(col("l_quantity").sum().alias("sum_qty"),
                 col("l_extendedprice").sum().alias("sum_base_price"),
                 revenue().sum().alias("sum_disc_price"),
                 (revenue() * (1 + col("l_tax"))).sum().alias("sum_charge"),
                 col("l_quantity").mean().alias("avg_qty"),
                 col("l_extendedprice").mean().alias("avg_price"),
                 col("l_discount").mean().alias("avg_disc"),
                 pl.len().alias("count_order"))
            .sort("l_returnflag", "l_linestatus"))


def q2(t: Frames) -> pl.LazyFrame:
    min_cost = (t["partsupp"]
                .join(t["supplier"], left_on="ps_suppkey", right_on="s_suppkey")
                .join(t["nation"], left_on="s_nationkey", right_on="n_nationkey")
                .join(t["region"], left_on="n_regionkey", right_on="r_regionkey")
                .filter(col("r_name") == "EUROPE")
                .group_by("ps_partkey")
                .agg(col("ps_supplycost").min().alias("min_supplycost"))
                .rename({"ps_partkey": "min_partkey"}))
    return (t["part"]
            .join(t["partsupp"], left_on="p_partkey", right_on="ps_partkey")
            .join(t["supplier"], left_on="ps_suppkey", right_on="s_suppkey")
            .join(t["nation"], left_on="s_nationkey", right_on="n_nationkey")
            .join(t["region"], left_on="n_regionkey", right_on="r_regionkey")
            .join(min_cost, left_on="p_partkey", right_on="min_partkey")
            .filter((col("p_size") == 15) & col("p_type").str.ends_with("BRASS")
                    & (col("r_name") == "EUROPE")
                    & (col("ps_supplycost") == col("min_supplycost")))
            .select("s_acctbal", "s_name", "n_name", "p_partkey", "p_mfgr", "s_address",
                    "s_phone", "s_comment")
            .sort(["s_acctbal", "n_name", "s_name", "p_partkey"],
                  descending=[True, False, False, False])
            .head(100))


def q3(t: Frames) -> pl.LazyFrame:
    return (t["customer"]
            .join(t["orders"], left_on="c_custkey", right_on="o_custkey")
            .join(t["lineitem"], left_on="o_orderkey", right_on="l_orderkey")
            .filter((col("c_mktsegment") == "BUILDING")
                    & (col("o_orderdate") < date("1995-03-15"))
                    & (col("l_shipdate") > date("1995-03-15")))
            .group_by(col("o_orderkey").alias("l_orderkey"), "o_orderdate", "o_shippriority")
            .agg(revenue().sum().alias("revenue"))
            .select("l_orderkey", "revenue", "o_orderdate", "o_shippriority")
            .sort(["revenue", "o_orderdate"], descending=[True, False])
            .head(10))


def q4(t: Frames) -> pl.LazyFrame:
    late = t["lineitem"].filter(col("l_commitdate") < col("l_receiptdate"))
    return (t["orders"]
            .join(late, left_on="o_orderkey", right_on="l_orderkey", how="semi")
            .filter((col("o_orderdate") >= date("1993-07-01"))
                    & (col("o_orderdate") < date("1993-10-01")))
            .group_by("o_orderpriority")
            .agg(pl.len().alias("order_count"))
            .sort("o_orderpriority"))


def q5(t: Frames) -> pl.LazyFrame:
    return (t["customer"]
            .join(t["orders"], left_on="c_custkey", right_on="o_custkey")
            .join(t["lineitem"], left_on="o_orderkey", right_on="l_orderkey")
            .join(t["supplier"], left_on=["l_suppkey", "c_nationkey"],
                  right_on=["s_suppkey", "s_nationkey"])
            .join(t["nation"], left_on="c_nationkey", right_on="n_nationkey")
            .join(t["region"], left_on="n_regionkey", right_on="r_regionkey")
            .filter((col("r_name") == "ASIA")
                    & (col("o_orderdate") >= date("1994-01-01"))
                    & (col("o_orderdate") < date("1995-01-01")))
            .group_by("n_name")
            .agg(revenue().sum().alias("revenue"))
            .sort("revenue", descending=True))


def q6(t: Frames) -> pl.LazyFrame:
    return (t["lineitem"]
            .filter((col("l_shipdate") >= date("1994-01-01"))
                    & (col("l_shipdate") < date("1995-01-01"))
                    & col("l_discount").is_between(0.05, 0.07)
                    & (col("l_quantity") < 24))
            .select((col("l_extendedprice") * col("l_discount")).sum().alias("revenue")))


def q7(t: Frames) -> pl.LazyFrame:
    n1, n2 = alias(t["nation"], "n1"), alias(t["nation"], "n2")
    shipping = (t["supplier"]
                .join(t["lineitem"], left_on="s_suppkey", right_on="l_suppkey")
                .join(t["orders"], left_on="l_orderkey", right_on="o_orderkey")
                .join(t["customer"], left_on="o_custkey", right_on="c_custkey")
                .join(n1, left_on="s_nationkey", right_on="n1_nationkey")
                .join(n2, left_on="c_nationkey", right_on="n2_nationkey")
                .filter((((col("n1_name") == "FRANCE") & (col("n2_name") == "GERMANY"))
                         | ((col("n1_name") == "GERMANY") & (col("n2_name") == "FRANCE")))
                        & col("l_shipdate").is_between(date("1995-01-01"), date("1996-12-31")))
                .select(col("n1_name").alias("supp_nation"), col("n2_name").alias("cust_nation"),
                        col("l_shipdate").dt.year().alias("l_year"), revenue().alias("volume")))
    return (shipping
            .group_by("supp_nation", "cust_nation", "l_year")
            .agg(col("volume").sum().alias("revenue"))
            .sort("supp_nation", "cust_nation", "l_year"))


def q8(t: Frames) -> pl.LazyFrame:
    n1, n2 = alias(t["nation"], "n1"), alias(t["nation"], "n2")
    all_nations = (t["part"]
                   .join(t["lineitem"], left_on="p_partkey", right_on="l_partkey")
                   .join(t["supplier"], left_on="l_suppkey", right_on="s_suppkey")
                   .join(t["orders"], left_on="l_orderkey", right_on="o_orderkey")
                   .join(t["customer"], left_on="o_custkey", right_on="c_custkey")
                   .join(n1, left_on="c_nationkey", right_on="n1_nationkey")
                   .join(t["region"], left_on="n1_regionkey", right_on="r_regionkey")
                   .join(n2, left_on="s_nationkey", right_on="n2_nationkey")
                   .filter((col("r_name") == "AMERICA")
                           & col("o_orderdate").is_between(date("1995-01-01"),
                                                           date("1996-12-31"))
                           & (col("p_type") == "ECONOMY ANODIZED STEEL"))
                   .select(col("o_orderdate").dt.year().alias("o_year"),
                           revenue().alias("volume"), col("n2_name").alias("nation")))
    brazil = pl.when(col("nation") == "BRAZIL").then(col("volume")).otherwise(0)
    return (all_nations
            .group_by("o_year")
            .agg((brazil.sum().cast(pl.Float64) / col("volume").sum().cast(pl.Float64))
                 .alias("mkt_share"))
            .sort("o_year"))


def q9(t: Frames) -> pl.LazyFrame:
    profit = (t["part"]
              .join(t["lineitem"], left_on="p_partkey", right_on="l_partkey")
              .join(t["supplier"], left_on="l_suppkey", right_on="s_suppkey")
              .join(t["partsupp"], left_on=["l_suppkey", "p_partkey"],
                    right_on=["ps_suppkey", "ps_partkey"])
              .join(t["orders"], left_on="l_orderkey", right_on="o_orderkey")
              .join(t["nation"], left_on="s_nationkey", right_on="n_nationkey")
              .filter(col("p_name").str.contains("green", literal=True))
              .select(col("n_name").alias("nation"),
                      col("o_orderdate").dt.year().alias("o_year"),
                      (revenue() - col("ps_supplycost") * col("l_quantity")).alias("amount")))
    return (profit
            .group_by("nation", "o_year")
            .agg(col("amount").sum().alias("sum_profit"))
            .sort(["nation", "o_year"], descending=[False, True]))


def q10(t: Frames) -> pl.LazyFrame:
    return (t["customer"]
            .join(t["orders"], left_on="c_custkey", right_on="o_custkey")
            .join(t["lineitem"], left_on="o_orderkey", right_on="l_orderkey")
            .join(t["nation"], left_on="c_nationkey", right_on="n_nationkey")
            .filter((col("o_orderdate") >= date("1993-10-01"))
                    & (col("o_orderdate") < date("1994-01-01"))
                    & (col("l_returnflag") == "R"))
            .group_by("c_custkey", "c_name", "c_acctbal", "c_phone", "n_name", "c_address",
                      "c_comment")
            .agg(revenue().sum().alias("revenue"))
            .select("c_custkey", "c_name", "revenue", "c_acctbal", "n_name", "c_address",
                    "c_phone", "c_comment")
            .sort("revenue", descending=True)
            .head(20))


def q11(t: Frames) -> pl.LazyFrame:
    def german_stock() -> pl.LazyFrame:
        return (t["partsupp"]
                .join(t["supplier"], left_on="ps_suppkey", right_on="s_suppkey")
                .join(t["nation"], left_on="s_nationkey", right_on="n_nationkey")
                .filter(col("n_name") == "GERMANY"))

    stock_value = col("ps_supplycost") * col("ps_availqty")
    threshold = german_stock().select((stock_value.sum() * 0.0001).alias("threshold"))
    return (german_stock()
            .group_by("ps_partkey")
            .agg(stock_value.sum().alias("value"))
            .join(threshold, how="cross")
            .filter(col("value") > col("threshold"))
            .select("ps_partkey", "value")
            .sort("value", descending=True))


def q12(t: Frames) -> pl.LazyFrame:
    urgent = col("o_orderpriority").is_in(["1-URGENT", "2-HIGH"])
    return (t["orders"]
            .join(t["lineitem"], left_on="o_orderkey", right_on="l_orderkey")
            .filter(col("l_shipmode").is_in(["MAIL", "SHIP"])
                    & (col("l_commitdate") < col("l_receiptdate"))
                    & (col("l_shipdate") < col("l_commitdate"))
                    & (col("l_receiptdate") >= date("1994-01-01"))
                    & (col("l_receiptdate") < date("1995-01-01")))
            .group_by("l_shipmode")
            .agg(pl.when(urgent).then(1).otherwise(0).sum().alias("high_line_count"),
                 pl.when(~urgent).then(1).otherwise(0).sum().alias("low_line_count"))
            .sort("l_shipmode"))


def q13(t: Frames) -> pl.LazyFrame:
    # The ON clause's condition on orders alone: Polars' left join takes equalities only,
    # so the orders are filtered before the join (the same rows meet).
    orders = t["orders"].filter(~col("o_comment").str.contains("special.*requests"))
    c_orders = (t["customer"]
                .join(orders, left_on="c_custkey", right_on="o_custkey", how="left")
                .group_by("c_custkey")
                .agg(col("o_orderkey").count().alias("c_count")))
    return (c_orders
            .group_by("c_count")
            .agg(pl.len().alias("custdist"))
            .sort(["custdist", "c_count"], descending=[True, True]))


def q14(t: Frames) -> pl.LazyFrame:
    promo = pl.when(col("p_type").str.starts_with("PROMO")).then(revenue()).otherwise(0)
    return (t["lineitem"]
            .join(t["part"], left_on="l_partkey", right_on="p_partkey")
            .filter((col("l_shipdate") >= date("1995-09-01"))
                    & (col("l_shipdate") < date("1995-10-01")))
            .select((100.0 * promo.sum().cast(pl.Float64) / revenue().sum().cast(pl.Float64))
                    .alias("promo_revenue")))


def q15(t: Frames) -> pl.LazyFrame:
    revenue0 = (t["lineitem"]
                .filter((col("l_shipdate") >= date("1996-01-01"))
                        & (col("l_shipdate") < date("1996-04-01")))
                .group_by(col("l_suppkey").alias("supplier_no"))
                .agg(revenue().sum().alias("total_revenue")))
    top = revenue0.select(col("total_revenue").max().alias("max_revenue"))
    return (t["supplier"]
            .join(revenue0, left_on="s_suppkey", right_on="supplier_no")
            .join(top, how="cross")
            .filter(col("total_revenue") == col("max_revenue"))
            .select("s_suppkey", "s_name", "s_address", "s_phone", "total_revenue")
            .sort("s_suppkey"))


def q16(t: Frames) -> pl.LazyFrame:
    complaints = t["supplier"].filter(col("s_comment").str.contains("Customer.*Complaints"))
    return (t["partsupp"]
            .join(t["part"], left_on="ps_partkey", right_on="p_partkey")
            .join(complaints, left_on="ps_suppkey", right_on="s_suppkey", how="anti")
            .filter((col("p_brand") != "Brand#45")
                    & ~col("p_type").str.starts_with("MEDIUM POLISHED")
                    & col("p_size").is_in([49, 14, 23, 45, 19, 3, 36, 9]))
            .group_by("p_brand", "p_type", "p_size")
            .agg(col("ps_suppkey").n_unique().alias("supplier_cnt"))
            .sort(["supplier_cnt", "p_brand", "p_type", "p_size"],
                  descending=[True, False, False, False]))


def q17(t: Frames) -> pl.LazyFrame:
    small = (t["lineitem"]
             .group_by(col("l_partkey").alias("small_partkey"))
             .agg((0.2 * col("l_quantity").mean()).alias("small_quantity")))
    return (t["lineitem"]
            .join(t["part"], left_on="l_partkey", right_on="p_partkey")
            .join(small, left_on="l_partkey", right_on="small_partkey")
            .filter((col("p_brand") == "Brand#23") & (col("p_container") == "MED BOX")
                    & (col("l_quantity") < col("small_quantity")))
            .select((col("l_extendedprice").sum().cast(pl.Float64) / 7.0).alias("avg_yearly")))


def q18(t: Frames) -> pl.LazyFrame:
    large = (t["lineitem"]
             .group_by("l_orderkey")
             .agg(col("l_quantity").sum().alias("order_quantity"))
             .filter(col("order_quantity") > 300))
    return (t["customer"]
            .join(t["orders"], left_on="c_custkey", right_on="o_custkey")
            .join(t["lineitem"], left_on="o_orderkey", right_on="l_orderkey")
            .join(large, left_on="o_orderkey", right_on="l_orderkey", how="semi")
            .group_by("c_name", col("c_custkey"), "o_orderkey", "o_orderdate", "o_totalprice")
            .agg(col("l_quantity").sum().alias("sum_qty"))
            .sort(["o_totalprice", "o_orderdate"], descending=[True, False])
            .head(100))


def q19(t: Frames) -> pl.LazyFrame:
    def kind(brand: str, containers: list[str], low: int, size: int) -> pl.Expr:
        return ((col("p_brand") == brand) & col("p_container").is_in(containers)
                & col("l_quantity").is_between(low, low + 10)
                & col("p_size").is_between(1, size)
                & col("l_shipmode").is_in(["AIR", "AIR REG"])
                & (col("l_shipinstruct") == "DELIVER IN PERSON"))

    return (t["lineitem"]
            .join(t["part"], left_on="l_partkey", right_on="p_partkey")
            .filter(kind("Brand#12", ["SM CASE", "SM BOX", "SM PACK", "SM PKG"], 1, 5)
                    | kind("Brand#23", ["MED BAG", "MED BOX", "MED PKG", "MED PACK"], 10, 10)
                    | kind("Brand#34", ["LG CASE", "LG BOX", "LG PACK", "LG PKG"], 20, 15))
            .select(revenue().sum().alias("revenue")))


def q20(t: Frames) -> pl.LazyFrame:
    forest = t["part"].filter(col("p_name").str.starts_with("forest"))
    shipped = (t["lineitem"]
               .filter((col("l_shipdate") >= date("1994-01-01"))
                       & (col("l_shipdate") < date("1995-01-01")))
               .group_by("l_partkey", "l_suppkey")
               .agg((0.5 * col("l_quantity").sum().cast(pl.Float64)).alias("half_quantity")))
    excess = (t["partsupp"]
              .join(forest, left_on="ps_partkey", right_on="p_partkey", how="semi")
              .join(shipped, left_on=["ps_partkey", "ps_suppkey"],
                    right_on=["l_partkey", "l_suppkey"])
              .filter(col("ps_availqty") > col("half_quantity")))
    return (t["supplier"]
            .join(t["nation"], left_on="s_nationkey", right_on="n_nationkey")
            .join(excess, left_on="s_suppkey", right_on="ps_suppkey", how="semi")
            .filter(col("n_name") == "CANADA")
            .select("s_name", "s_address")
            .sort("s_name"))


def q21(t: Frames) -> pl.LazyFrame:
    # EXISTS / NOT EXISTS with l_suppkey <> l1.l_suppkey: Polars joins on equalities only,
    # so the usual formulation counts distinct suppliers per order: another supplier
    # exists when there are two or more; no other supplier was late when the late ones
    # are only l1's own.
    lineitem = t["lineitem"]
    suppliers = lineitem.group_by("l_orderkey").agg(col("l_suppkey").n_unique().alias("n_supp"))
    late_suppliers = (lineitem
                      .filter(col("l_receiptdate") > col("l_commitdate"))
                      .group_by("l_orderkey")
                      .agg(col("l_suppkey").n_unique().alias("n_late")))
    return (t["supplier"]
            .join(lineitem, left_on="s_suppkey", right_on="l_suppkey")
            .join(t["orders"], left_on="l_orderkey", right_on="o_orderkey")
            .join(t["nation"], left_on="s_nationkey", right_on="n_nationkey")
            .join(suppliers, on="l_orderkey")
            .join(late_suppliers, on="l_orderkey")
            .filter((col("o_orderstatus") == "F")
                    & (col("l_receiptdate") > col("l_commitdate"))
                    & (col("n_name") == "SAUDI ARABIA")
                    & (col("n_supp") > 1) & (col("n_late") == 1))
            .group_by("s_name")
            .agg(pl.len().alias("numwait"))
            .sort(["numwait", "s_name"], descending=[True, False])
            .head(100))


def q22(t: Frames) -> pl.LazyFrame:
    codes = ["13", "31", "23", "29", "30", "18", "17"]
    cntrycode = col("c_phone").str.slice(0, 2)
    average = (t["customer"]
               .filter((col("c_acctbal") > 0.0) & cntrycode.is_in(codes))
               .select(col("c_acctbal").mean().alias("avg_acctbal")))
    custsale = (t["customer"]
                .join(t["orders"], left_on="c_custkey", right_on="o_custkey", how="anti")
                .join(average, how="cross")
                .filter(cntrycode.is_in(codes) & (col("c_acctbal") > col("avg_acctbal")))
                .select(cntrycode.alias("cntrycode"), "c_acctbal"))
    return (custsale
            .group_by("cntrycode")
            .agg(pl.len().alias("numcust"), col("c_acctbal").sum().alias("totacctbal"))
            .sort("cntrycode"))


QUERIES: dict[str, Callable[[Frames], Any]] = {f"q{i}": globals()[f"q{i}"] for i in range(1, 23)}
