//! Reading a KPI file: the supported shape, its keys, its measures and their
//! merge rules, all taken from DataFusion's logical plan.

use std::fmt;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::functions_aggregate::expr_fn::bit_or;
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::logical_expr::ExprSchemable;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, LogicalPlan, LogicalPlanBuilder, Operator, Volatility, bitwise_or,
    cast, lit, when,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use datafusion::sql::unparser::Unparser;
use datafusion::sql::unparser::dialect::PostgreSqlDialect;

use datafusion::execution::context::SQLOptions;

/// A KPI file that cannot be used, with what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpiError {
    pub file: String,
    pub construct: String,
    pub hint: String,
}

impl fmt::Display for KpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.construct)?;
        if !self.hint.is_empty() {
            write!(f, " — {}", self.hint)?;
        }
        Ok(())
    }
}

impl std::error::Error for KpiError {}

/// The aggregate functions a KPI may use, each with its merge rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    CountDistinct,
}

impl Func {
    /// How a batch's partial value joins the stored one.
    pub fn rule(self) -> &'static str {
        match self {
            Func::Count | Func::Sum => "add",
            Func::Min => "least",
            Func::Max => "greatest",
            Func::Avg => "sum and count added; divided when read",
            Func::CountDistinct => "exact: new (key, value) members counted and added",
        }
    }
}

/// A column of the KPI's state table.
#[derive(Debug, Clone)]
pub struct StateCol {
    pub name: String,
    pub data_type: DataType,
    pub pg_type: String,
}

/// A group key.
#[derive(Debug, Clone)]
pub struct Key {
    /// Its name in the KPI's view.
    pub name: String,
    pub col: StateCol,
}

/// One aggregate of the query, as stored.
#[derive(Debug, Clone)]
pub struct Measure {
    /// The aggregate as written (for `check`).
    pub display: String,
    pub func: Func,
    /// State columns: one, or sum and count for avg.
    pub cols: Vec<StateCol>,
    /// For count(DISTINCT x): the type of x.
    pub member: Option<StateCol>,
}

/// A column of the KPI's view: a key, a measure, or an expression over them.
#[derive(Debug, Clone)]
pub struct Output {
    pub name: String,
    /// Postgres expression over the state table's columns.
    pub pg_expr: String,
}

/// An analysed KPI file.
#[derive(Debug, Clone)]
pub struct KpiDef {
    pub name: String,
    pub description: Option<String>,
    pub sql: String,
    pub hash: String,
    pub keys: Vec<Key>,
    pub measures: Vec<Measure>,
    pub outputs: Vec<Output>,
    /// keys k0.. then every non-distinct measure's state columns, per batch.
    pub(crate) partial: LogicalPlan,
    /// The membership sets of the count(DISTINCT) measures.
    pub sets: Vec<MemberSet>,
}

/// The count(DISTINCT) measures of one KPI that count the same expression
/// share one membership set of `(keys…, v, f)`: the member `v` under the
/// keys, and in the flags `f` the measures (bit `1 << j` for `measures[j]`)
/// whose FILTER it has passed. A funnel's five stages then keep one member
/// per (day, customer), not five. [`super::members`] stores the sets.
#[derive(Debug, Clone)]
pub struct MemberSet {
    /// Indexes into [`KpiDef::measures`], at most [`MAX_SET_MEASURES`].
    pub measures: Vec<usize>,
    /// The type of the counted expression, column `v`.
    pub member: StateCol,
    /// Per batch: keys k0.., the member `v` and its flags `f`, one row per
    /// (keys, member).
    pub(crate) plan: LogicalPlan,
}

/// Flags are a Postgres integer; more measures over one expression take
/// another set.
pub const MAX_SET_MEASURES: usize = 31;

/// Part of every KPI's hash: a change of how KPIs are stored, or of how
/// their views compute, makes every installed KPI rebuild from `events` at
/// the next `migrate` or start (a view is only made with its tables).
const STORAGE_LAYOUT: &str = "member-log/1 view/2";

impl KpiDef {
    /// The columns of a batch's partial rows, in the order the partial plan
    /// produces them: keys, then every non-distinct measure's state columns.
    pub fn partial_cols(&self) -> Vec<StateCol> {
        self.keys
            .iter()
            .map(|k| k.col.clone())
            .chain(
                self.measures
                    .iter()
                    .filter(|m| m.func != Func::CountDistinct)
                    .flat_map(|m| m.cols.iter().cloned()),
            )
            .collect()
    }
}

/// Prefixes a KPI name cannot take: the tables of other KPIs (a KPI `a`
/// keeps `kpi_state_a` and `kpi_members_a_s0`, so a KPI named
/// `kpi_state_a` would collide with it), and Postgres' own `pg_`, whose
/// catalogs an unqualified name would find first.
const RESERVED_PREFIXES: &[&str] = &["kpi_state_", "kpi_members_", "pg_"];

/// Postgres' reserved key words, and those that can be a function or a
/// type but not a table (`pg_get_keywords()`, categories R and T, Postgres
/// 15, and `system_user` from 16): a view of such a name cannot be read
/// without quotes.
pub const PG_RESERVED_WORDS: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// FNV-1a of the text: stable across builds, used to notice a changed file.
pub fn hash(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The query as DataFusion reads it, for the hash: its tokens without
/// comments or spacing, keywords and unquoted names in lower case (DataFusion
/// folds those), so that editing them does not rebuild the KPI. Strings,
/// numbers and quoted names stay as written.
fn canonical(sql: &str) -> String {
    let Some(tokens) = significant_tokens(sql) else {
        return sql.to_string();
    };
    let mut words: Vec<String> = tokens
        .iter()
        .map(|t| match t {
            Token::Word(w) if w.quote_style.is_none() => w.value.to_lowercase(),
            t => t.to_string(),
        })
        .collect();
    while words.last().is_some_and(|w| w == ";") {
        words.pop();
    }
    words.join(" ")
}

/// The most tokens a KPI file may hold: over six times the largest shipped
/// file, and few enough that its deepest expression plans within
/// [`super::PLANNING_STACK`] and runs within the runtime's worker stacks.
pub const MAX_KPI_TOKENS: usize = 2_000;

/// How deep calls of `coalesce`, `nvl`, `nvl2` and `ifnull` may nest.
pub const MAX_NULL_FUNCTION_DEPTH: usize = 8;

/// The tokens of `sql` without spacing, comments and the end marker;
/// `None` when it does not tokenize, which the parser then reports.
fn significant_tokens(sql: &str) -> Option<Vec<Token>> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql).tokenize().ok()?;
    Some(
        tokens
            .into_iter()
            .filter(|t| !matches!(t, Token::Whitespace(_) | Token::EOF))
            .collect(),
    )
}

/// Whether the SQL text `expr` calls one of DataFusion's aggregate functions.
fn calls_an_aggregate(expr: &str) -> bool {
    let aggregates = datafusion::functions_aggregate::all_default_aggregate_functions();
    let is_aggregate = |name: &str| {
        aggregates
            .iter()
            .any(|a| a.name() == name || a.aliases().iter().any(|x| x == name))
    };
    let tokens = significant_tokens(expr).unwrap_or_default();
    tokens.windows(2).any(|w| {
        matches!(w, [Token::Word(f), Token::LParen]
            if f.quote_style.is_none() && is_aggregate(&f.value.to_ascii_lowercase()))
    })
}

/// The deepest nesting of calls of `coalesce`, `nvl`, `nvl2` or `ifnull`
/// among `tokens` (flat, so that it cannot recurse).
fn null_function_depth(tokens: &[Token]) -> usize {
    // Per open parenthesis, whether it opened one of those calls.
    let mut open: Vec<bool> = Vec::new();
    let (mut depth, mut deepest) = (0usize, 0usize);
    for (i, t) in tokens.iter().enumerate() {
        match t {
            Token::LParen => {
                let call = i > 0
                    && matches!(&tokens[i - 1], Token::Word(w) if w.quote_style.is_none()
                        && matches!(w.value.to_ascii_lowercase().as_str(),
                            "coalesce" | "nvl" | "nvl2" | "ifnull"));
                if call {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                open.push(call);
            }
            // The guard pops for every `)`, whichever arm then runs.
            Token::RParen if open.pop() == Some(true) => depth -= 1,
            _ => {}
        }
    }
    deepest
}

/// The optional header: leading `--` comment lines.
fn description(sql: &str) -> Option<String> {
    let lines: Vec<&str> = sql
        .lines()
        .map(str::trim)
        .take_while(|l| l.starts_with("--"))
        .map(|l| l.trim_start_matches('-').trim())
        .filter(|l| !l.is_empty())
        .collect();
    (!lines.is_empty()).then(|| lines.join(" "))
}

/// The Postgres type of an Arrow type, for state, staging and member tables.
pub fn pg_type(t: &DataType) -> Option<String> {
    Some(match t {
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "integer".into(),
        DataType::Int64 | DataType::UInt32 => "bigint".into(),
        DataType::Float32 | DataType::Float64 => "double precision".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => "text".into(),
        DataType::Date32 => "date".into(),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Decimal128(p, s) if *s >= 0 => format!("numeric({p},{s})"),
        _ => return None,
    })
}

/// The type a view's number is cast to, so that it reads as DataFusion's:
/// the ones [`pg_type`] stores numbers as.
fn view_type(t: &DataType) -> Option<DataType> {
    Some(match t {
        DataType::Int8 | DataType::Int16 | DataType::Int32 => DataType::Int32,
        DataType::Int64 | DataType::UInt32 => DataType::Int64,
        DataType::Float32 | DataType::Float64 => DataType::Float64,
        DataType::Decimal128(_, s) if *s >= 0 => t.clone(),
        _ => return None,
    })
}

/// `plan` with DataFusion's type coercion applied, as it is executed: a
/// built plan types `sum(CASE ... THEN session_id ELSE 0.5 END)` as the
/// integer of its first branch, the coerced one as the double it sums.
fn coerced(ctx: &SessionContext, plan: LogicalPlan) -> Result<LogicalPlan, String> {
    let state = ctx.state();
    state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})
        .map_err(|e| format!("planning failed: {e}"))
}

/// The aggregate's schema with the types of `coerced` (the same query,
/// coerced), position by position: the names stay the plan's, which the
/// projection refers to.
fn typed_schema(
    agg: &Aggregate,
    coerced: &LogicalPlan,
) -> Result<datafusion::common::DFSchemaRef, String> {
    let mut node = coerced;
    let types = loop {
        match node {
            LogicalPlan::Aggregate(a) => break a.schema.clone(),
            LogicalPlan::Projection(p) => node = p.input.as_ref(),
            other => return Err(format!("planning failed: no aggregate in {other}")),
        }
    };
    let fields = agg
        .schema
        .iter()
        .zip(types.fields())
        .map(|((q, f), t)| {
            let f = f.as_ref().clone().with_data_type(t.data_type().clone());
            (q.cloned(), std::sync::Arc::new(f))
        })
        .collect();
    datafusion::common::DFSchema::new_with_metadata(fields, agg.schema.metadata().clone())
        .map(std::sync::Arc::new)
        .map_err(|e| format!("planning failed: {e}"))
}

/// Arrow types the COPY encoder writes directly; others are cast first.
pub fn copy_type(t: &DataType) -> DataType {
    match t {
        DataType::Int8 | DataType::Int16 => DataType::Int32,
        DataType::UInt32 => DataType::Int64,
        DataType::Float32 => DataType::Float64,
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
        other => other.clone(),
    }
}

pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, construct: impl Into<String>, hint: impl Into<String>) -> KpiError {
        KpiError {
            file: self.file.to_string(),
            construct: construct.into(),
            hint: hint.into(),
        }
    }
}

const SHAPE: &str =
    "a KPI is one `SELECT <keys>, <aggregates> FROM events [WHERE ...] GROUP BY <keys>`";

/// Parses, plans and checks one KPI file.
pub async fn analyse(
    ctx: &SessionContext,
    file: &str,
    name: &str,
    sql: &str,
) -> Result<KpiDef, KpiError> {
    let c = Ctx { file };
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_lowercase())
        && name
            .chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
        && name.len() <= 40;
    if !valid_name {
        return Err(c.err(
            format!("file name {name:?}"),
            "name KPI files with lowercase letters, digits and _ (at most 40), starting with a letter: the name becomes a table and a view",
        ));
    }
    // Installing the KPI would replace a shipped view without a word, or
    // fail on a table, in `run` after `check` said OK.
    if crate::sink::migrate::CORE_RELATIONS.contains(&name) {
        return Err(c.err(
            format!("the name {name}"),
            "it is one of the pipeline's own tables or views; rename the file",
        ));
    }
    if PG_RESERVED_WORDS.contains(&name) {
        return Err(c.err(
            format!("the name {name}"),
            format!(
                "it is a reserved word in Postgres' SQL, so `SELECT * FROM {name}` would not read \
                 the view (`user` reads the current user, `order` does not parse); rename the file"
            ),
        ));
    }
    if let Some(p) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(*p)) {
        return Err(c.err(
            format!("the name {name}"),
            format!("names starting with {p} are the pipeline's or Postgres' own; rename the file"),
        ));
    }
    // Both checks read the tokens, which is flat, so that they refuse a file
    // before anything recurses over it. A file that does not tokenize is
    // the parser's to report.
    let tokens = significant_tokens(sql).unwrap_or_default();
    // DataFusion's planner expands each of these into its arguments more
    // than once, so its work doubles with each level of nesting: 22 levels
    // of `coalesce(coalesce(…, 0), 0)` took gigabytes, in a file of 351 bytes.
    let depth = null_function_depth(&tokens);
    if depth > MAX_NULL_FUNCTION_DEPTH {
        return Err(c.err(
            format!("coalesce, nvl, nvl2 or ifnull nested {depth} deep"),
            format!(
                "at most {MAX_NULL_FUNCTION_DEPTH} levels, since planning doubles its work with \
                 each; give one coalesce all the arguments instead: coalesce(a, b, c, 0)"
            ),
        ));
    }
    // Each operator of a chain such as `a + b + c ...` nests one level deeper
    // in every tree DataFusion and this module walk, recursively: a long
    // enough file overflows the stack, which aborts the process (a running
    // `run` that reloads it included).
    let n = tokens.len();
    if n > MAX_KPI_TOKENS {
        return Err(c.err(
            format!("a query of {n} tokens"),
            format!(
                "a KPI file may hold at most {MAX_KPI_TOKENS} tokens (words, numbers, operators), \
                 since a longer expression can exhaust the stack while it is planned; split the \
                 KPI into several files"
            ),
        ));
    }
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx
        .sql_with_options(sql, options)
        .await
        .map_err(|e| classify_sql_error(&c, sql, &e.to_string()))?;
    let plan = df.logical_plan().clone();

    let (projection, agg) = match &plan {
        LogicalPlan::Projection(p) => match p.input.as_ref() {
            LogicalPlan::Aggregate(a) => (Some(p), a),
            other => return Err(construct_error(&c, other)),
        },
        LogicalPlan::Aggregate(a) => (None, a),
        other => return Err(construct_error(&c, other)),
    };
    check_input(&c, &agg.input)?;
    let mut all_exprs: Vec<&Expr> = agg.group_expr.iter().chain(&agg.aggr_expr).collect();
    if let Some(p) = projection {
        all_exprs.extend(&p.expr);
    }
    for e in all_exprs {
        check_expr(&c, e)?;
    }
    if agg.group_expr.is_empty() {
        return Err(c.err(
            "a query without GROUP BY",
            format!("{SHAPE}; group by something, e.g. date_trunc('day', event_time)"),
        ));
    }
    // Planned, but not executable: DataFusion's physical planner then
    // failed with a dump of the aggregate's whole signature.
    if let Some(g) = agg.group_expr.iter().find(|g| {
        g.exists(|e| Ok(matches!(e, Expr::AggregateFunction(_))))
            .unwrap_or(false)
    }) {
        return Err(c.err(format!("an aggregate in GROUP BY ({g})"), GROUP_BY_KEYS));
    }
    if agg
        .group_expr
        .iter()
        .any(|g| matches!(g, Expr::GroupingSet(_)))
    {
        return Err(c.err(
            "GROUPING SETS / ROLLUP / CUBE",
            "write one KPI file per grouping",
        ));
    }

    let analysed = Analysed::new(&c, agg)?;
    let coerced = |plan: LogicalPlan| coerced(ctx, plan).map_err(|e| c.err(e, SHAPE));
    let partial = coerced(analysed.partial_plan(&c, agg)?)?;
    let typed = typed_schema(agg, &coerced(plan.clone())?).map_err(|e| c.err(e, SHAPE))?;
    let sets = analysed
        .member_sets(&c, agg)?
        .into_iter()
        .map(|(measures, plan)| {
            let plan = coerced(plan)?;
            Ok(MemberSet {
                measures,
                member: member_col(&c, &plan)?,
                plan,
            })
        })
        .collect::<Result<Vec<_>, KpiError>>()?;
    let schema = partial.schema().clone();
    let state_col = |name: &str| -> Result<StateCol, KpiError> {
        let (_, f) = schema
            .qualified_field_with_unqualified_name(name)
            .map_err(|e| c.err(format!("internal planning error: {e}"), ""))?;
        let data_type = copy_type(f.data_type());
        let pg = pg_type(&data_type).ok_or_else(|| {
            c.err(
                format!("a column of type {}", f.data_type()),
                "cast it to text, bigint, numeric, double, date or timestamp",
            )
        })?;
        Ok(StateCol {
            name: name.to_string(),
            data_type,
            pg_type: pg,
        })
    };

    let mut measures = Vec::new();
    for (i, m) in analysed.measures.iter().enumerate() {
        let cols = match m.func {
            Func::Avg => vec![
                state_col(&format!("m{i}_sum"))?,
                state_col(&format!("m{i}_n"))?,
            ],
            Func::CountDistinct => vec![StateCol {
                name: format!("m{i}"),
                data_type: DataType::Int64,
                pg_type: "bigint".into(),
            }],
            _ => vec![state_col(&format!("m{i}"))?],
        };
        let member = match m.func {
            Func::CountDistinct => {
                let set = sets
                    .iter()
                    .find(|set| set.measures.contains(&i))
                    .expect("every distinct measure is in a set");
                Some(set.member.clone())
            }
            _ => None,
        };
        measures.push(Measure {
            display: m.display.clone(),
            func: m.func,
            cols,
            member,
        });
    }

    let mut keys = Vec::new();
    for j in 0..agg.group_expr.len() {
        keys.push(Key {
            name: format!("k{j}"),
            col: state_col(&format!("k{j}"))?,
        });
    }
    let outputs = analysed.outputs(
        &c,
        agg,
        &typed,
        projection.map(|p| p.expr.as_slice()),
        &mut keys,
    )?;

    // Postgres' own limit, found by `check` rather than by the install
    // after it said OK: the state table's unique index over the keys. (Its
    // 1600 columns a table are out of reach within MAX_KPI_TOKENS.)
    if keys.len() > PG_INDEX_MAX_KEYS {
        return Err(c.err(
            format!("{} GROUP BY keys", keys.len()),
            format!(
                "Postgres' index over a KPI's keys takes at most {PG_INDEX_MAX_KEYS}; group by \
                 fewer, or split the KPI into several files"
            ),
        ));
    }

    Ok(KpiDef {
        name: name.to_string(),
        description: description(sql),
        sql: sql.to_string(),
        hash: hash(&format!("{STORAGE_LAYOUT}\n{}", canonical(sql))),
        keys,
        measures,
        outputs,
        partial,
        sets,
    })
}

/// The column `v` of a membership plan.
fn member_col(c: &Ctx<'_>, plan: &LogicalPlan) -> Result<StateCol, KpiError> {
    let (_, f) = plan
        .schema()
        .qualified_field_with_unqualified_name("v")
        .map_err(|e| c.err(format!("internal planning error: {e}"), ""))?;
    let data_type = copy_type(f.data_type());
    Ok(StateCol {
        name: "v".into(),
        pg_type: pg_type(&data_type)
            .ok_or_else(|| c.err(format!("count(DISTINCT) over type {}", f.data_type()), ""))?,
        data_type,
    })
}

/// How GROUP BY must name a KPI's keys.
const GROUP_BY_KEYS: &str = "every SELECT column is either a key, listed in GROUP BY by its \
     expression, alias or position (counted from 1), or an aggregate such as count(*); GROUP BY \
     lists the keys only, never an aggregate";

fn classify_sql_error(c: &Ctx<'_>, sql: &str, msg: &str) -> KpiError {
    if let Some(e) = classify_statement(c, sql) {
        return e;
    }
    let lower = msg.to_lowercase();
    if lower.contains("ddl not supported") {
        c.err(
            "DDL (CREATE, DROP, ALTER, CREATE EXTERNAL TABLE)",
            format!("{SHAPE}; tables are managed by the pipeline"),
        )
    } else if lower.contains("dml not supported") {
        c.err(
            "DML (INSERT, UPDATE, DELETE, COPY)",
            format!("{SHAPE}; the pipeline writes the results"),
        )
    } else if lower.contains("statement not supported") || lower.contains("set variant") {
        c.err("a statement such as SET", SHAPE)
    } else if lower.contains("table") && lower.contains("not found") {
        c.err(
            format!("a table other than events ({})", first_line(msg)),
            "KPIs read only the `events` micro-batch",
        )
    } else if lower.contains("must be in group by") {
        // DataFusion's text speaks of "expanding wildcard" where there is
        // none, and a GROUP BY position that points at an aggregate leaves
        // the real key in SELECT alone.
        c.err(
            "a SELECT column that is neither a GROUP BY key nor inside an aggregate",
            GROUP_BY_KEYS,
        )
    } else if lower.contains("single sql statement") {
        c.err("more than one statement", "one SELECT per file")
    } else if lower.contains("duplicate unqualified field name") {
        c.err(
            format!(
                "two aggregates DataFusion names alike ({})",
                first_line(msg)
            ),
            "DataFusion names an aggregate after its argument with any CAST or AT TIME ZONE \
             left out, so max(x) and max(CAST(x AS VARCHAR)), or min(t) and min(t AT TIME ZONE \
             'Europe/Berlin'), clash whatever their aliases; put one of them in a KPI file of \
             its own",
        )
    } else {
        // DataFusion's own text starts "SQL error: ParserError(\"...\")".
        let text = first_line(msg).trim_start_matches("SQL error: ");
        match text
            .strip_prefix("ParserError(\"")
            .and_then(|t| t.strip_suffix("\")"))
        {
            Some(syntax) => c.err(format!("SQL error: syntax: {syntax}"), SHAPE),
            None => c.err(format!("SQL error: {text}"), SHAPE),
        }
    }
}

/// The construct of a statement DataFusion could not plan, read from its
/// syntax tree, where DataFusion's own error would name something else: a
/// self-join `USING` a column fails on duplicate field names, `INSERT INTO x`
/// on the missing table, `SET TIME ZONE` on an unimplemented variant.
fn classify_statement(c: &Ctx<'_>, sql: &str) -> Option<KpiError> {
    use datafusion::sql::parser::{DFParser, Statement as DfStatement};
    use datafusion::sql::sqlparser::ast::{SetExpr, Statement};
    let statements = DFParser::parse_sql(sql).ok()?;
    let [statement] = Vec::from(statements).try_into().ok()?;
    match statement {
        DfStatement::Statement(s) => match *s {
            Statement::Insert(_)
            | Statement::Update(_)
            | Statement::Delete(_)
            | Statement::Copy { .. }
            | Statement::Merge(_) => Some(c.err(
                "DML (INSERT, UPDATE, DELETE, COPY)",
                format!("{SHAPE}; the pipeline writes the results"),
            )),
            Statement::Set(_) => Some(c.err("a statement such as SET", SHAPE)),
            Statement::Query(q) => match q.body.as_ref() {
                SetExpr::Select(s)
                    if s.from.len() > 1 || s.from.iter().any(|t| !t.joins.is_empty()) =>
                {
                    Some(construct_join(c))
                }
                // DataFusion names the aggregate in GROUP BY and the one in
                // SELECT alike, and says only that two fields clash.
                SetExpr::Select(s) => match &s.group_by {
                    datafusion::sql::sqlparser::ast::GroupByExpr::Expressions(keys, _) => keys
                        .iter()
                        .find(|k| calls_an_aggregate(&k.to_string()))
                        .map(|k| c.err(format!("an aggregate in GROUP BY ({k})"), GROUP_BY_KEYS)),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        },
        _ => None,
    }
}

fn construct_join(c: &Ctx<'_>) -> KpiError {
    c.err(
        "JOIN",
        "KPIs read only the events micro-batch; join the KPI's view with other tables when you query it",
    )
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn construct_error(c: &Ctx<'_>, plan: &LogicalPlan) -> KpiError {
    match plan {
        LogicalPlan::Join(_) => construct_join(c),
        LogicalPlan::Sort(_) => c.err("ORDER BY", "order when you query the KPI's view"),
        LogicalPlan::Limit(_) => c.err("LIMIT", "limit when you query the KPI's view"),
        LogicalPlan::Window(_) => c.err(
            "window functions (OVER)",
            "they cannot be merged batch by batch; compute them when you query the view",
        ),
        LogicalPlan::Distinct(_) => c.err(
            "SELECT DISTINCT",
            "use GROUP BY, or count(DISTINCT x) as a measure",
        ),
        LogicalPlan::Union(_) => c.err("UNION", "write one KPI file per query"),
        LogicalPlan::Filter(_) => c.err("HAVING", "filter when you query the KPI's view"),
        LogicalPlan::Subquery(_) | LogicalPlan::SubqueryAlias(_) => c.err("a subquery", SHAPE),
        LogicalPlan::TableScan(_) | LogicalPlan::Projection(_) => c.err(
            "a query without aggregates",
            format!("{SHAPE}; a KPI aggregates, e.g. count(*) or sum(payment_amount)"),
        ),
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => {
            c.err("a query that does not read events", SHAPE)
        }
        LogicalPlan::Dml(_) | LogicalPlan::Copy(_) => {
            c.err("DML (INSERT, UPDATE, DELETE, COPY)", SHAPE)
        }
        LogicalPlan::Ddl(_) => c.err("DDL", SHAPE),
        LogicalPlan::Statement(_) => c.err("a statement such as SET", SHAPE),
        other => c.err(format!("the construct {}", other.display()), SHAPE),
    }
}

/// Below the aggregate: filters, projections and aliases over `events` only.
fn check_input(c: &Ctx<'_>, plan: &LogicalPlan) -> Result<(), KpiError> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            if scan.table_name.table() != "events" {
                return Err(c.err(
                    format!("table {}", scan.table_name),
                    "KPIs read only the `events` micro-batch",
                ));
            }
            Ok(())
        }
        LogicalPlan::Filter(f) => {
            check_expr(c, &f.predicate)?;
            check_input(c, &f.input)
        }
        LogicalPlan::Projection(p) => {
            for e in &p.expr {
                check_expr(c, e)?;
            }
            check_input(c, &p.input)
        }
        LogicalPlan::SubqueryAlias(a) => match a.input.as_ref() {
            LogicalPlan::TableScan(_) => check_input(c, &a.input),
            _ => Err(c.err("a subquery in FROM", SHAPE)),
        },
        other => Err(construct_error(c, other)),
    }
}

/// No subqueries, no window functions, nothing non-deterministic.
fn check_expr(c: &Ctx<'_>, e: &Expr) -> Result<(), KpiError> {
    let mut found: Option<KpiError> = None;
    let _ = e.apply(|e| {
        let problem = match e {
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) => {
                Some(c.err("a subquery", SHAPE))
            }
            Expr::WindowFunction(_) => Some(c.err(
                "window functions (OVER)",
                "they cannot be merged batch by batch; compute them when you query the view",
            )),
            Expr::ScalarFunction(f) if f.func.signature().volatility != Volatility::Immutable => {
                let name = f.func.name();
                Some(c.err(
                    format!("the non-deterministic function {name}()"),
                    if matches!(name, "random" | "uuid") {
                        "a KPI must give the same result whenever it is recomputed, so it cannot draw random values"
                    } else {
                        "a KPI must give the same result whenever it is recomputed: use event_time, not the clock"
                    },
                ))
            }
            // DataFusion fails the batch on it (the KPI is disabled), and
            // Postgres every read of the view: refused up front instead.
            Expr::BinaryExpr(b)
                if matches!(b.op, Operator::Divide | Operator::Modulo)
                    && is_constant_zero(&b.right) =>
            {
                Some(c.err(
                    format!("a division by the constant 0 ({e})"),
                    "divide by something that can be non-zero, e.g. nullif(count(x), 0)",
                ))
            }
            Expr::AggregateFunction(f)
                if f.func.signature().volatility != Volatility::Immutable =>
            {
                Some(c.err(
                    format!("the non-deterministic aggregate {}()", f.func.name()),
                    "use count, sum, min, max, avg or count(DISTINCT x)",
                ))
            }
            _ => None,
        };
        match problem {
            Some(p) => {
                found = Some(p);
                Ok(TreeNodeRecursion::Stop)
            }
            None => Ok(TreeNodeRecursion::Continue),
        }
    });
    found.map_or(Ok(()), Err)
}

/// Whether `e` reads no column and folds to a numeric zero: `0`, `0.0`,
/// `-0.0`, `CAST(0 AS BIGINT)`, `(1 - 1)`.
fn is_constant_zero(e: &Expr) -> bool {
    use datafusion::common::ScalarValue;
    use datafusion::optimizer::simplify_expressions::ExprSimplifier;
    if !e.column_refs().is_empty() {
        return false;
    }
    let simplifier =
        ExprSimplifier::new(datafusion::logical_expr::simplify::SimplifyContext::default());
    match simplifier.simplify(e.clone()) {
        Ok(Expr::Literal(v, _)) => match v {
            ScalarValue::Float32(Some(x)) => x == 0.0,
            ScalarValue::Float64(Some(x)) => x == 0.0,
            v => ScalarValue::new_zero(&v.data_type()).is_ok_and(|zero| v == zero),
        },
        _ => false,
    }
}

struct AnalysedMeasure {
    func: Func,
    agg: AggregateFunction,
    display: String,
}

struct Analysed {
    measures: Vec<AnalysedMeasure>,
}

impl Analysed {
    fn new(c: &Ctx<'_>, agg: &Aggregate) -> Result<Self, KpiError> {
        let mut measures = Vec::new();
        for e in &agg.aggr_expr {
            let inner = e.clone().unalias();
            let Expr::AggregateFunction(f) = inner else {
                return Err(c.err(format!("the expression {e}"), SHAPE));
            };
            let name = f.func.name().to_lowercase();
            let p = &f.params;
            if !p.order_by.is_empty() {
                return Err(c.err(
                    format!("ORDER BY inside {name}()"),
                    "an ordered aggregate cannot be merged batch by batch",
                ));
            }
            let func = match (name.as_str(), p.distinct) {
                ("count", true) if p.args.len() == 1 => Func::CountDistinct,
                ("count", true) => {
                    return Err(c.err(
                        "count(DISTINCT ...) over several expressions",
                        "count the distinct values of one expression; for pairs, count one that \
                         joins them, e.g. count(DISTINCT concat(a, '|', b))",
                    ));
                }
                (_, true) => {
                    return Err(c.err(
                        format!("{name}(DISTINCT ...)"),
                        "DISTINCT is supported in count(DISTINCT x) only",
                    ));
                }
                ("count", false) => Func::Count,
                ("sum", false) => Func::Sum,
                ("min", false) => Func::Min,
                ("max", false) => Func::Max,
                ("avg" | "mean", false) => Func::Avg,
                (other, _) => {
                    return Err(c.err(
                        format!("the aggregate {other}()"),
                        "use count(*), count(x), sum, min, max, avg or count(DISTINCT x); they merge exactly batch by batch",
                    ));
                }
            };
            measures.push(AnalysedMeasure {
                func,
                display: e.schema_name().to_string(),
                agg: f,
            });
        }
        Ok(Analysed { measures })
    }

    fn planning_error(c: &Ctx<'_>, e: impl fmt::Display) -> KpiError {
        c.err(format!("planning failed: {e}"), SHAPE)
    }

    fn keys(agg: &Aggregate) -> Vec<Expr> {
        agg.group_expr
            .iter()
            .enumerate()
            .map(|(j, g)| g.clone().alias(format!("k{j}")))
            .collect()
    }

    fn partial_plan(&self, c: &Ctx<'_>, agg: &Aggregate) -> Result<LogicalPlan, KpiError> {
        let mut aggs = Vec::new();
        for (i, m) in self.measures.iter().enumerate() {
            let p = &m.agg.params;
            let make = |func, args: Vec<Expr>, alias: String| {
                Expr::AggregateFunction(AggregateFunction::new_udf(
                    func,
                    args,
                    false,
                    p.filter.clone(),
                    vec![],
                    None,
                ))
                .alias(alias)
            };
            match m.func {
                Func::Avg => {
                    // DataFusion averages integers as doubles; their sum
                    // here is exact, where an integer sum would wrap past
                    // 2^63.
                    let sum_args = p
                        .args
                        .iter()
                        .map(|a| match a.get_type(agg.input.schema().as_ref()) {
                            Ok(t) if t.is_integer() => cast(a.clone(), DataType::Decimal128(38, 0)),
                            _ => a.clone(),
                        })
                        .collect();
                    aggs.push(make(sum_udaf(), sum_args, format!("m{i}_sum")));
                    aggs.push(make(count_udaf(), p.args.clone(), format!("m{i}_n")));
                }
                Func::CountDistinct => {}
                _ => aggs.push(make(m.agg.func.clone(), p.args.clone(), format!("m{i}"))),
            }
        }
        LogicalPlanBuilder::from(agg.input.as_ref().clone())
            .aggregate(Self::keys(agg), aggs)
            .and_then(|b| b.build())
            .map_err(|e| Self::planning_error(c, e))
    }

    /// One plan per membership set: the distinct measures grouped by the
    /// expression they count, each measure one bit of the flags.
    fn member_sets(
        &self,
        c: &Ctx<'_>,
        agg: &Aggregate,
    ) -> Result<Vec<(Vec<usize>, LogicalPlan)>, KpiError> {
        let mut groups: Vec<(Expr, Vec<usize>)> = Vec::new();
        for (i, m) in self.measures.iter().enumerate() {
            if m.func != Func::CountDistinct {
                continue;
            }
            let arg = &m.agg.params.args[0];
            match groups
                .iter_mut()
                .find(|(a, ms)| a == arg && ms.len() < MAX_SET_MEASURES)
            {
                Some((_, ms)) => ms.push(i),
                None => groups.push((arg.clone(), vec![i])),
            }
        }
        let mut out = Vec::new();
        for (arg, measures) in groups {
            let mut any: Option<Expr> = None;
            let mut flags: Option<Expr> = None;
            for (j, &i) in measures.iter().enumerate() {
                let bit = lit(1i32 << j);
                let (cond, flag) = match &self.measures[i].agg.params.filter {
                    Some(f) => {
                        let f = f.as_ref().clone();
                        // FILTER treats NULL as false, and so does CASE.
                        let flag = when(f.clone(), bit)
                            .otherwise(lit(0i32))
                            .map_err(|e| Self::planning_error(c, e))?;
                        (f, flag)
                    }
                    None => (lit(true), bit),
                };
                any = Some(any.map_or(cond.clone(), |a| a.or(cond)));
                flags = Some(flags.map_or(flag.clone(), |x| bitwise_or(x, flag)));
            }
            let cond = arg
                .clone()
                .is_not_null()
                .and(any.expect("a set has a measure"));
            let mut group = Self::keys(agg);
            group.push(arg.alias("v"));
            let plan = LogicalPlanBuilder::from(agg.input.as_ref().clone())
                .filter(cond)
                .and_then(|b| {
                    b.aggregate(
                        group,
                        vec![bit_or(flags.expect("a set has a measure")).alias("f")],
                    )
                })
                .and_then(|b| b.build())
                .map_err(|e| Self::planning_error(c, e))?;
            out.push((measures, plan));
        }
        Ok(out)
    }

    /// Why case mapping and regular expressions over text the view
    /// computes are refused.
    const COLLATED: &str = "Postgres maps case and character classes by the collation (ASCII \
        only under the \"C\" one the view reads text in); apply it in GROUP BY \
        (GROUP BY upper(channel)) or when reading the view";

    /// `e` with DataFusion's precision where Postgres' is finer, or refused
    /// where Postgres cannot compute what DataFusion does. Runs on the
    /// expression as planned, whose types are DataFusion's:
    /// - a decimal quotient is cut to DataFusion's result scale (DataFusion
    ///   truncates; Postgres keeps 16 digits or more);
    /// - `date_part` gives DataFusion's whole numbers (`second` is 59 where
    ///   Postgres gives 59.75), and the `epoch` of a duration as DataFusion
    ///   computes it (the fraction only under 2.147483648 s);
    /// - refused: `TRY_CAST` (Postgres has none), `date_part` of a part
    ///   DataFusion lacks, of nanoseconds, and of fields of a duration or
    ///   interval (DataFusion counts 71 hours where Postgres reads the field,
    ///   23); `date_bin`; a float made text; case mapping, regular
    ///   expressions, ILIKE and SIMILAR TO, which Postgres applies by the
    ///   collation (ASCII-only under the `"C"` one the view reads text in)
    ///   or anchors.
    fn datafusion_precision(
        c: &Ctx<'_>,
        schema: &datafusion::common::DFSchemaRef,
        e: Expr,
        name: &str,
    ) -> Result<Expr, KpiError> {
        let mut refused = None;
        let _ = e.apply(|x| {
            let problem = match x {
                Expr::TryCast(_) => Some(c.err(
                    format!("TRY_CAST in {name}, which the view computes"),
                    "Postgres has no TRY_CAST; use CAST, or TRY_CAST inside the aggregate \
                     (sum(TRY_CAST(x AS INT)))",
                )),
                Expr::ScalarFunction(f) if f.name() == "date_part" => {
                    let unit = date_part_unit(f);
                    let of = f.args.get(1).and_then(|a| a.get_type(schema.as_ref()).ok());
                    if !unit.is_empty() && !datafusion_date_part(&unit) {
                        Some(c.err(
                            format!("date_part('{unit}', ...) in {name}"),
                            "DataFusion has no such part (Postgres has); use year, quarter, month, \
                             week, day, hour, minute, second, millisecond, microsecond, dow, isodow, \
                             doy, isoyear or epoch",
                        ))
                    } else if unit.starts_with("nanosecond") {
                        Some(c.err(
                            format!("date_part('{unit}', ...) in {name}, which the view computes"),
                            "Postgres has no nanoseconds; use microseconds",
                        ))
                    } else if matches!(of, Some(DataType::Duration(_) | DataType::Interval(_)))
                        && unit != "epoch"
                    {
                        Some(c.err(
                            format!("date_part('{unit}', ...) of a duration in {name}"),
                            "DataFusion counts the whole duration in that unit, Postgres reads \
                             one field of it; use extract(epoch FROM ...) and divide",
                        ))
                    } else {
                        None
                    }
                }
                Expr::ScalarFunction(f) if f.name() == "date_bin" => Some(c.err(
                    format!("date_bin in {name}, which the view computes"),
                    "Postgres reads its origin in the session's time zone; bin the time in \
                     GROUP BY, or use date_trunc",
                )),
                Expr::ScalarFunction(f)
                    if matches!(
                        f.name(),
                        "upper" | "lower" | "initcap" | "regexp_replace" | "regexp_like"
                            | "regexp_match" | "regexp_count" | "regexp_instr"
                    ) =>
                {
                    Some(c.err(
                        format!("{}() in {name}, which the view computes", f.name()),
                        Self::COLLATED,
                    ))
                }
                Expr::BinaryExpr(b)
                    if matches!(
                        b.op,
                        Operator::RegexMatch
                            | Operator::RegexIMatch
                            | Operator::RegexNotMatch
                            | Operator::RegexNotIMatch
                            | Operator::ILikeMatch
                            | Operator::NotILikeMatch
                    ) =>
                {
                    Some(c.err(
                        format!("a regular expression or ILIKE in {name}, which the view computes"),
                        Self::COLLATED,
                    ))
                }
                Expr::Like(l) if l.case_insensitive => Some(c.err(
                    format!("ILIKE in {name}, which the view computes"),
                    Self::COLLATED,
                )),
                Expr::BinaryExpr(b)
                    if compares(b.op)
                        && ((is_duration(&b.left, schema) && is_interval(&b.right, schema))
                        || (is_interval(&b.left, schema) && is_duration(&b.right, schema))) =>
                {
                    Some(c.err(
                        format!("a time span compared with an interval in {name}"),
                        "DataFusion compares `max(t) - min(t) > INTERVAL '30 days'` wrongly (false \
                         for 155 days); compare seconds: extract(epoch FROM max(t) - min(t)) > \
                         30 * 86400",
                    ))
                }
                Expr::SimilarTo(_) => Some(c.err(
                    format!("SIMILAR TO in {name}, which the view computes"),
                    "DataFusion reads SIMILAR TO as an unanchored regular expression, Postgres as \
                     an anchored pattern; compare in GROUP BY or when reading the view",
                )),
                _ if makes_text_of(x, schema, DataType::is_floating) => Some(c.err(
                    format!("a float turned into text in {name}, which the view computes"),
                    "DataFusion writes 3.89e22 where Postgres writes 3.89e+22, and Postgres' \
                     digits follow the session's extra_float_digits; turn it into text when \
                     reading the view",
                )),
                _ => None,
            };
            Ok(match problem {
                Some(p) => {
                    refused = Some(p);
                    TreeNodeRecursion::Stop
                }
                None => TreeNodeRecursion::Continue,
            })
        });
        if let Some(e) = refused {
            return Err(e);
        }
        e.transform_up(|x| {
            if let Some(exact) = float_rounding(&x, schema) {
                return Ok(Transformed::yes(exact));
            }
            // The places to cut at: Some(None) for a whole number (Postgres'
            // trunc of a double takes no places).
            let cut = match &x {
                Expr::BinaryExpr(b) if b.op == Operator::Divide => {
                    match x.get_type(schema.as_ref()) {
                        Ok(DataType::Decimal128(_, s) | DataType::Decimal256(_, s)) => {
                            Some(Some(datafusion::prelude::lit(i64::from(s))))
                        }
                        _ => None,
                    }
                }
                Expr::ScalarFunction(f) if f.name() == "date_part" => {
                    let of = f.args.get(1).and_then(|a| a.get_type(schema.as_ref()).ok());
                    if date_part_unit(f) != "epoch" {
                        Some(None)
                    } else if matches!(of, Some(DataType::Duration(_))) {
                        // DataFusion adds a duration's fraction only while
                        // its nanoseconds fit an i32 (2.147483647 s); past
                        // that, whole seconds.
                        use datafusion::prelude::lit;
                        let short = datafusion::functions::math::expr_fn::abs(x.clone())
                            .lt_eq(lit(2.147_483_647_f64));
                        let whole = datafusion::functions::math::expr_fn::trunc(vec![x.clone()]);
                        return datafusion::logical_expr::when(short, x)
                            .otherwise(whole)
                            .map(Transformed::yes);
                    } else {
                        None
                    }
                }
                _ => None,
            };
            Ok(match cut {
                Some(places) => Transformed::yes(datafusion::functions::math::expr_fn::trunc(
                    std::iter::once(x).chain(places).collect(),
                )),
                None => Transformed::no(x),
            })
        })
        .map(|t| t.data)
        .map_err(|e| Self::planning_error(c, e))
    }

    /// `e` rewritten so that Postgres computes what DataFusion means, where
    /// the two read the same SQL differently; or refused where no rewrite
    /// exists:
    /// - a cast of a decimal or float to an integer truncates in DataFusion
    ///   and rounds in Postgres, so the value is truncated first;
    /// - `^` is bitwise XOR in DataFusion and a power in Postgres.
    fn postgres_meaning(
        c: &Ctx<'_>,
        schema: &datafusion::common::DFSchemaRef,
        e: Expr,
        name: &str,
    ) -> Result<Expr, KpiError> {
        let mut refused = None;
        let out = e
            .transform_up(|x| {
                match &x {
                    Expr::BinaryExpr(b) if b.op == Operator::BitwiseXor => {
                        refused = Some(c.err(
                            format!("the operator ^ (bitwise XOR) in {name}"),
                            "Postgres reads ^ as a power; compute the XOR when reading the view (Postgres spells it #)",
                        ));
                    }
                    // `100.0` is a double in DataFusion and a numeric in
                    // Postgres, so `count(*) * 100.0` would compute exact
                    // decimals where DataFusion computes doubles. (Not for
                    // `%`: Postgres has no double modulo.)
                    Expr::BinaryExpr(b)
                        if matches!(
                            b.op,
                            Operator::Plus | Operator::Minus | Operator::Multiply | Operator::Divide
                        ) && (is_float_literal(&b.left) || is_float_literal(&b.right)) =>
                    {
                        let double = |e: &Expr| {
                            if is_float_literal(e) {
                                cast(e.clone(), DataType::Float64)
                            } else {
                                e.clone()
                            }
                        };
                        let doubled = Expr::BinaryExpr(BinaryExpr::new(
                            Box::new(double(&b.left)),
                            b.op,
                            Box::new(double(&b.right)),
                        ));
                        return Ok(Transformed::yes(
                            ieee_division(&doubled, schema).unwrap_or(doubled),
                        ));
                    }
                    // Postgres has no `%` of doubles; DataFusion's keeps
                    // the dividend's sign, as trunc does.
                    Expr::BinaryExpr(b)
                        if b.op == Operator::Modulo
                            && x.get_type(schema.as_ref()).is_ok_and(|t| t.is_floating()) =>
                    {
                        let l = cast(b.left.as_ref().clone(), DataType::Float64);
                        let r = cast(b.right.as_ref().clone(), DataType::Float64);
                        let whole = datafusion::functions::math::expr_fn::trunc(vec![
                            l.clone() / r.clone(),
                        ]);
                        return Ok(Transformed::yes(l - r * whole));
                    }
                    _ if let Some(divided) = ieee_division(&x, schema) => {
                        return Ok(Transformed::yes(divided));
                    }
                    // Postgres' concat writes a boolean as t or f, and its
                    // cast to text (which `||` uses) as true or false, as
                    // DataFusion writes it everywhere.
                    Expr::ScalarFunction(f)
                        if matches!(f.name(), "concat" | "concat_ws")
                            && f.args.iter().any(|a| {
                                matches!(a.get_type(schema.as_ref()), Ok(DataType::Boolean))
                            }) =>
                    {
                        let mut f = f.clone();
                        f.args = f
                            .args
                            .iter()
                            .map(|a| match a.get_type(schema.as_ref()) {
                                Ok(DataType::Boolean) => cast(a.clone(), DataType::Utf8),
                                _ => a.clone(),
                            })
                            .collect();
                        return Ok(Transformed::yes(Expr::ScalarFunction(f)));
                    }
                    Expr::ScalarFunction(f) if f.name() == "to_char" => {
                        refused = Some(c.err(
                            format!("to_char in {name}, which the view computes"),
                            "DataFusion's and Postgres' format patterns differ (%Y against YYYY); \
                             format the value when reading the view",
                        ));
                    }
                    _ if is_time_constant(&x, schema) => {
                        if let Some(folded) = time_constant(&x) {
                            return Ok(Transformed::yes(folded));
                        }
                    }
                    // DataFusion computes these in the timestamp's own zone
                    // (UTC, or the one `AT TIME ZONE` gave it); Postgres in
                    // the reading session's. Pinned to that zone, a Grafana
                    // session in +05:45 reads the day DataFusion computed.
                    // (The epoch is of the instant, whatever its zone.)
                    Expr::ScalarFunction(f)
                        if matches!(f.name(), "date_trunc" | "date_part")
                            && !(f.name() == "date_part" && date_part_unit(f) == "epoch")
                            && let Some(tz) = f.args.iter().find_map(|a| zone_of(a, schema)) =>
                    {
                        let mut f = f.clone();
                        f.args = f.args.iter().map(|a| wall_clock(a, schema)).collect();
                        let truncates = f.name() == "date_trunc";
                        let call = Expr::ScalarFunction(f);
                        // date_trunc's wall-clock result back to an instant.
                        return Ok(Transformed::yes(if truncates {
                            pg_timezone(&tz, call)
                        } else {
                            call
                        }));
                    }
                    // A time compared with, or taken from, a time of another
                    // kind: DataFusion gives the zone-less side (a date, a
                    // time, a string) the other side's zone before it
                    // compares; Postgres reads it in the session's.
                    Expr::BinaryExpr(b)
                        if (compares(b.op) || b.op == Operator::Minus)
                            && let Some((zoned_left, unit, tz)) = mixed_zones(&b.left, &b.right, schema) =>
                    {
                        let (mut left, mut right) = (b.left.as_ref().clone(), b.right.as_ref().clone());
                        let other = if zoned_left { &mut right } else { &mut left };
                        *other = in_zone(other.clone(), unit, &tz, schema);
                        return Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(
                            Box::new(left),
                            b.op,
                            Box::new(right),
                        ))));
                    }
                    // A zone-less time or a date given a zone: DataFusion
                    // reads it as that zone's wall clock, Postgres as the
                    // session's (`TIMESTAMP '2025-06-02'` compared with an
                    // instant, `date_trunc(...) >= DATE '2025-06-02'`).
                    Expr::Cast(cast)
                        if matches!(cast.field.data_type(), DataType::Timestamp(_, Some(_)))
                            && matches!(
                                cast.expr.get_type(schema.as_ref()),
                                Ok(DataType::Timestamp(_, None) | DataType::Date32 | DataType::Date64)
                            ) =>
                    {
                        let DataType::Timestamp(unit, Some(tz)) = cast.field.data_type() else {
                            unreachable!("matched above")
                        };
                        let e = cast.expr.as_ref().clone();
                        return Ok(Transformed::yes(in_zone(e, *unit, tz, schema)));
                    }
                    _ if makes_text_of(&x, schema, DataType::is_temporal) => {
                        refused = Some(c.err(
                            format!("a time turned into text in {name}, which the view computes"),
                            "DataFusion writes 2025-06-01T21:09:00Z where Postgres writes \
                             2025-06-01 21:09:00+00 (and dates after the session's DateStyle); \
                             turn it into text when reading the view",
                        ));
                    }
                    // A date, or a wall-clock time, of a timestamp is the one
                    // of its zone in DataFusion; Postgres' cast gives the
                    // session's.
                    Expr::Cast(cast)
                        if matches!(
                            cast.field.data_type(),
                            DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, None)
                        ) && zone_of(&cast.expr, schema).is_some() =>
                    {
                        return Ok(Transformed::yes(Expr::Cast(datafusion::logical_expr::Cast {
                            expr: Box::new(wall_clock(&cast.expr, schema)),
                            field: cast.field.clone(),
                        })));
                    }
                    // Postgres adds days and months to a timestamptz in the
                    // session's zone (a day across a DST change is 23 or 25
                    // hours); DataFusion in the timestamp's. So the sum is
                    // taken on that zone's wall clock and read back in it.
                    Expr::BinaryExpr(b)
                        if matches!(b.op, Operator::Plus | Operator::Minus)
                            && let Some(tz) = (if is_interval(&b.right, schema) {
                                zone_of(&b.left, schema)
                            } else if b.op == Operator::Plus && is_interval(&b.left, schema) {
                                zone_of(&b.right, schema)
                            } else {
                                None
                            }) =>
                    {
                        return Ok(Transformed::yes(pg_timezone(
                            &tz,
                            Expr::BinaryExpr(BinaryExpr::new(
                                Box::new(wall_clock(&b.left, schema)),
                                b.op,
                                Box::new(wall_clock(&b.right, schema)),
                            )),
                        )));
                    }
                    Expr::Cast(cast) if cast.field.data_type().is_integer() => {
                        let from = cast.expr.get_type(schema.as_ref());
                        if from.is_ok_and(|t| t.is_floating() || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..))) {
                            let truncated = datafusion::functions::math::expr_fn::trunc(vec![
                                cast.expr.as_ref().clone(),
                            ]);
                            return Ok(Transformed::yes(Expr::Cast(
                                datafusion::logical_expr::Cast {
                                    expr: Box::new(truncated),
                                    field: cast.field.clone(),
                                },
                            )));
                        }
                    }
                    _ => {}
                }
                Ok(Transformed::no(x))
            })
            .map_err(|e| Self::planning_error(c, e))?
            .data;
        match refused {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// The view's columns: the projection with aggregate results replaced by
    /// reads of the stored parts, unparsed as Postgres SQL.
    fn outputs(
        &self,
        c: &Ctx<'_>,
        agg: &Aggregate,
        typed: &datafusion::common::DFSchemaRef,
        projection: Option<&[Expr]>,
        keys: &mut [Key],
    ) -> Result<Vec<Output>, KpiError> {
        let n_keys = agg.group_expr.len();
        let out_names: Vec<String> = agg
            .schema
            .fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let default_projection: Vec<Expr> = agg
            .schema
            .iter()
            .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
            .collect();
        let exprs = projection.unwrap_or(&default_projection);
        let read = |idx: usize| -> Expr {
            if idx < n_keys {
                return Expr::Column(Column::from_name(format!("k{idx}")));
            }
            let i = idx - n_keys;
            match self.measures[i].func {
                Func::Avg => {
                    let t = typed.field(idx).data_type();
                    let mut sum = Expr::Column(Column::from_name(format!("m{i}_sum")));
                    // An average of integers is DataFusion's double; the
                    // sum is stored as an exact numeric.
                    if *t == DataType::Float64 {
                        sum = cast(sum, DataType::Float64);
                    }
                    let avg = Expr::BinaryExpr(BinaryExpr::new(
                        Box::new(sum),
                        Operator::Divide,
                        Box::new(datafusion::functions::expr_fn::nullif(
                            Expr::Column(Column::from_name(format!("m{i}_n"))),
                            datafusion::prelude::lit(0i64),
                        )),
                    ));
                    // DataFusion cuts a decimal average to its result's
                    // scale; Postgres would keep 16 digits or more.
                    match t {
                        DataType::Decimal128(_, s) | DataType::Decimal256(_, s) => {
                            datafusion::functions::math::expr_fn::trunc(vec![
                                avg,
                                datafusion::prelude::lit(i64::from(*s)),
                            ])
                        }
                        _ => avg,
                    }
                }
                // A sum of integers is stored as numeric so that it never
                // overflows; read back as DataFusion's type, or `sum(x) /
                // count(*)` would divide as decimals where DataFusion
                // divides integers.
                Func::Sum => {
                    let stored = Expr::Column(Column::from_name(format!("m{i}")));
                    match typed.field(idx).data_type() {
                        // DataFusion's sum wraps past 2^63: so does the
                        // read, where a cast would fail every read of the
                        // view. Within range it is the sum itself.
                        DataType::Int64 => {
                            use datafusion::common::ScalarValue;
                            let big = |v: i128| lit(ScalarValue::Decimal128(Some(v), 38, 0));
                            let (half, whole) = (big(1 << 63), big(1 << 64));
                            let modulo = |a: Expr| {
                                Expr::BinaryExpr(BinaryExpr::new(
                                    Box::new(a),
                                    Operator::Modulo,
                                    Box::new(whole.clone()),
                                ))
                            };
                            let wrapped =
                                modulo(modulo(stored + half.clone()) + whole.clone()) - half;
                            cast(wrapped, DataType::Int64)
                        }
                        t if t.is_integer() => cast(stored, t.clone()),
                        _ => stored,
                    }
                }
                _ => Expr::Column(Column::from_name(format!("m{i}"))),
            }
        };
        let unparser = Unparser::new(&PostgreSqlDialect {});
        let mut outputs = Vec::new();
        for e in exprs {
            let name = match e {
                Expr::Alias(a) => a.name.clone(),
                Expr::Column(c) => c.name.clone(),
                _ => e.schema_name().to_string(),
            };
            let exact = Self::datafusion_precision(c, typed, e.clone().unalias(), &name)?;
            let inner = Self::postgres_meaning(c, typed, exact, &name)?;
            let is_key = if let Expr::Column(col) = &inner
                && let Some(idx) = out_names.iter().position(|n| *n == col.name)
                && idx < n_keys
            {
                keys[idx].name = name.clone();
                true
            } else {
                false
            };
            let rewritten = inner
                .transform_up(|x| {
                    if let Expr::Column(col) = &x
                        && let Some(idx) = out_names.iter().position(|n| *n == col.name)
                    {
                        return Ok(Transformed::yes(read(idx)));
                    }
                    // A divisor that is 0 in one row (`count(*) /
                    // count(payment_amount)` for a type without payments)
                    // would make every read of the whole view fail in
                    // Postgres; that row reads NULL instead.
                    if let Expr::BinaryExpr(b) = &x
                        && matches!(b.op, Operator::Divide | Operator::Modulo)
                        && !matches!(b.right.as_ref(), Expr::Literal(..))
                        && !matches!(b.right.as_ref(), Expr::Cast(c) if matches!(*c.expr, Expr::Literal(..)))
                        && !matches!(b.right.as_ref(), Expr::ScalarFunction(f) if f.name() == "nullif")
                    {
                        let right = datafusion::functions::expr_fn::nullif(
                            b.right.as_ref().clone(),
                            datafusion::prelude::lit(0i64),
                        );
                        return Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(
                            b.left.clone(),
                            b.op,
                            Box::new(right),
                        ))));
                    }
                    // DataFusion gives -inf or NaN where Postgres fails every
                    // read of the view (`ln(count(payment_amount))` for a type
                    // without payments); that row reads DataFusion's answer.
                    if let Expr::ScalarFunction(f) = &x
                        && matches!(f.name(), "ln" | "log" | "log10" | "sqrt")
                        && let [a] = f.args.as_slice()
                    {
                        let special = |v: &str| cast(lit(v), DataType::Float64);
                        let a = a.clone();
                        return Ok(Transformed::yes(if f.name() == "sqrt" {
                            when(a.lt(lit(0)), special("NaN")).otherwise(x.clone())?
                        } else {
                            when(a.clone().gt(lit(0)), x.clone())
                                .when(a.clone().eq(lit(0)), special("-Infinity"))
                                .when(a.lt(lit(0)), special("NaN"))
                                .end()?
                        }));
                    }
                    // Postgres' to_timestamp(double) is a timestamptz, which
                    // a session shows, and date_trunc cuts, on its own wall
                    // clock; DataFusion's (no time_zone is configured) is the
                    // UTC wall clock, without a zone.
                    if let Expr::ScalarFunction(f) = &x
                        && f.name() == "to_timestamp"
                        && f.args.len() == 1
                    {
                        return Ok(Transformed::yes(pg_timezone("UTC", x.clone())));
                    }
                    // log(b, x) outside its domain reads NULL (log(1, x)
                    // divides by ln(1) = 0 in Postgres).
                    if let Expr::ScalarFunction(f) = &x
                        && f.name() == "log"
                        && let [b, v] = f.args.as_slice()
                    {
                        let mut f = f.clone();
                        f.args = vec![
                            when(b.clone().gt(lit(0)).and(b.clone().not_eq(lit(1))), b.clone())
                                .end()?,
                            when(v.clone().gt(lit(0)), v.clone()).end()?,
                        ];
                        return Ok(Transformed::yes(Expr::ScalarFunction(f)));
                    }
                    Ok(Transformed::no(x))
                })
                .map_err(|e| Self::planning_error(c, e))?
                .data;
            // Postgres' own types for the expression (`numeric` for
            // `coalesce(sum(x), 0)`, reading 0 where DataFusion reads 0.00;
            // a double for `extract`) made to DataFusion's. Keys are stored
            // in their type already.
            let rewritten = match e.get_type(typed.as_ref()).ok().and_then(|t| view_type(&t)) {
                Some(t) if !is_key => cast(rewritten, t),
                _ => rewritten,
            };
            let sql = unparser
                .expr_to_sql(&rewritten)
                .map_err(|e| c.err(format!("the expression {name}: {e}"), SHAPE))?
                .to_string();
            if name.is_empty() {
                return Err(c.err(
                    "an output with an empty name (AS \"\")",
                    "Postgres has no empty column names; give the column a name",
                ));
            }
            if name == "updated_at" {
                return Err(c.err(
                    "an output named updated_at",
                    "the pipeline adds updated_at to every KPI; rename the column",
                ));
            }
            if outputs.iter().any(|o: &Output| o.name == name) {
                return Err(c.err(
                    format!("two outputs named {name}"),
                    "give each column its own alias",
                ));
            }
            // Postgres keeps the first 63 bytes of a name, so the view
            // would fail to install with "specified more than once".
            if let Some(o) = outputs.iter().find(|o| pg_name(&o.name) == pg_name(&name)) {
                return Err(c.err(
                    format!(
                        "two outputs named alike in their first 63 bytes ({} and {name})",
                        o.name
                    ),
                    "Postgres keeps only the first 63 bytes of a column name; shorten one alias",
                ));
            }
            outputs.push(Output { name, pg_expr: sql });
        }
        Ok(outputs)
    }
}

/// Columns in one index (INDEX_MAX_KEYS), as Postgres is built.
const PG_INDEX_MAX_KEYS: usize = 32;

/// The bytes Postgres keeps of a name (NAMEDATALEN - 1); it cuts a longer
/// one without an error, and two cut names can then meet.
pub const PG_NAME_BYTES: usize = 63;

/// A name as Postgres keeps it: its first [`PG_NAME_BYTES`], cut at a
/// character.
pub fn pg_name(name: &str) -> &str {
    &name[..name.floor_char_boundary(PG_NAME_BYTES)]
}

/// Whether DataFusion's `date_part` knows `unit` (lower case).
fn datafusion_date_part(unit: &str) -> bool {
    use datafusion::arrow::compute::kernels::cast_utils::IntervalUnit;
    match unit.parse::<IntervalUnit>() {
        Ok(u) => !matches!(u, IntervalUnit::Century | IntervalUnit::Decade),
        Err(_) => matches!(
            unit,
            "isoyear" | "qtr" | "quarter" | "doy" | "dow" | "isodow" | "epoch"
        ),
    }
}

/// `round(x, n)` or `trunc(x, n)` of a double as DataFusion computes it:
/// scaled by 10^n, rounded half away from zero or cut, and scaled back, all
/// in doubles. Postgres has neither of a double with places (the unparser
/// would round a `numeric` made of 15 digits of `x`), and its `round` of a
/// double rounds half to even. None for anything else.
fn float_rounding(x: &Expr, schema: &datafusion::common::DFSchemaRef) -> Option<Expr> {
    use datafusion::common::ScalarValue;
    use datafusion::functions::math::expr_fn::{floor, trunc};
    let Expr::ScalarFunction(f) = x else {
        return None;
    };
    let rounds = match f.name() {
        "round" => true,
        "trunc" if f.args.len() == 2 => false,
        _ => return None,
    };
    let value = f.args.first()?;
    if !value.get_type(schema.as_ref()).ok()?.is_floating() {
        return None;
    }
    let places = match f.args.get(1) {
        None => 0,
        Some(Expr::Literal(v, _)) => match v.cast_to(&DataType::Int32).ok()? {
            ScalarValue::Int32(Some(n)) => n,
            _ => return None,
        },
        Some(_) => return None,
    };
    // Past a double's range 10^n is infinite or 0, which Postgres cannot
    // write or divide by.
    if !(-300..=300).contains(&places) {
        return None;
    }
    let factor = lit(10_f64.powi(places));
    let y = value.clone() * factor.clone();
    let whole = if rounds {
        // floor(|y|), plus one when what it drops is at least a half: exact
        // in doubles, where floor(y + 0.5) is not.
        let away = |y: Expr| {
            let down = floor(y.clone());
            let up = when((y - down.clone()).gt_eq(lit(0.5_f64)), lit(1_f64))
                .otherwise(lit(0_f64))
                .ok()?;
            Some(down + up)
        };
        when(y.clone().lt(lit(0_f64)), -away(-y.clone())?)
            .otherwise(away(y)?)
            .ok()?
    } else {
        trunc(vec![y])
    };
    Some(whole / factor)
}

/// `date_part`'s unit, lower case (`epoch`, `second`, ...); empty when it
/// is not a constant.
fn date_part_unit(f: &datafusion::logical_expr::expr::ScalarFunction) -> String {
    match f.args.first() {
        Some(Expr::Literal(v, _)) => v
            .try_as_str()
            .flatten()
            .map(|u| u.trim().to_lowercase())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// Whether `x` makes text of a value of a type `of` picks: a cast to text,
/// `concat`, `||`.
fn makes_text_of(
    x: &Expr,
    schema: &datafusion::common::DFSchemaRef,
    of: impl Fn(&DataType) -> bool,
) -> bool {
    let is = |e: &Expr| e.get_type(schema.as_ref()).is_ok_and(|t| of(&t));
    match x {
        Expr::Cast(cast) => {
            matches!(
                cast.field.data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) && is(&cast.expr)
        }
        Expr::ScalarFunction(f) if matches!(f.name(), "concat" | "concat_ws") => {
            f.args.iter().any(is)
        }
        Expr::BinaryExpr(b) if b.op == Operator::StringConcat => is(&b.left) || is(&b.right),
        _ => false,
    }
}

fn is_temporal(e: &Expr, schema: &datafusion::common::DFSchemaRef) -> bool {
    e.get_type(schema.as_ref()).is_ok_and(|t| t.is_temporal())
}

fn is_duration(e: &Expr, schema: &datafusion::common::DFSchemaRef) -> bool {
    matches!(e.get_type(schema.as_ref()), Ok(DataType::Duration(_)))
}

fn is_interval(e: &Expr, schema: &datafusion::common::DFSchemaRef) -> bool {
    matches!(e.get_type(schema.as_ref()), Ok(DataType::Interval(_)))
}

/// The zone of a timestamp that has one: UTC for `event_time` and its
/// aggregates, `Asia/Kathmandu` for `x AT TIME ZONE 'Asia/Kathmandu'`.
fn zone_of(e: &Expr, schema: &datafusion::common::DFSchemaRef) -> Option<std::sync::Arc<str>> {
    match e.get_type(schema.as_ref()) {
        Ok(DataType::Timestamp(_, Some(tz))) => Some(tz),
        _ => None,
    }
}

/// `e` on the wall clock of its zone when it has one; `e` otherwise.
fn wall_clock(e: &Expr, schema: &datafusion::common::DFSchemaRef) -> Expr {
    match zone_of(e, schema) {
        Some(tz) => pg_timezone(&tz, e.clone()),
        None => e.clone(),
    }
}

/// `n / d` of doubles with DataFusion's answer for a zero divisor: infinity
/// or NaN, as IEEE divides, where Postgres would fail every read of the
/// view. None for other divisions, and for a constant divisor.
fn ieee_division(x: &Expr, schema: &datafusion::common::DFSchemaRef) -> Option<Expr> {
    let Expr::BinaryExpr(b) = x else {
        return None;
    };
    let constant = |e: &Expr| match e {
        Expr::Cast(c) => matches!(*c.expr, Expr::Literal(..)),
        e => matches!(e, Expr::Literal(..)),
    };
    if b.op != Operator::Divide
        || constant(&b.right)
        || !x.get_type(schema.as_ref()).ok()?.is_floating()
    {
        return None;
    }
    let special = |v: &str| cast(lit(v), DataType::Float64);
    let n = b.left.as_ref().clone();
    let by_zero = when(n.clone().gt(lit(0_f64)), special("Infinity"))
        .when(n.clone().lt(lit(0_f64)), special("-Infinity"))
        .when(n.is_not_null(), special("NaN"))
        .end()
        .ok()?;
    when(b.right.as_ref().clone().eq(lit(0_f64)), by_zero)
        .otherwise(x.clone())
        .ok()
}

/// Whether `op` compares two values (equality, order, distinctness).
fn compares(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
    )
}

/// Whether `e` is a literal DataFusion types as a double (`100.0`).
fn is_float_literal(e: &Expr) -> bool {
    use datafusion::common::ScalarValue;
    matches!(
        e,
        Expr::Literal(
            ScalarValue::Float64(Some(_)) | ScalarValue::Float32(Some(_)),
            _
        )
    )
}

/// Whether `e` is a time constant that only literals and casts make
/// (`TIMESTAMP '2025-06-01 12:00:00'`, `CAST('2025-06-01T12:00:00Z' AS
/// TIMESTAMP)`), which DataFusion can fold here.
fn is_time_constant(e: &Expr, schema: &datafusion::common::DFSchemaRef) -> bool {
    matches!(e, Expr::Literal(..) | Expr::Cast(_))
        && is_temporal(e, schema)
        && !e
            .exists(|x| Ok(!matches!(x, Expr::Literal(..) | Expr::Cast(_))))
            .unwrap_or(true)
}

/// A time constant as Postgres must read it to mean what DataFusion means:
/// folded by DataFusion (a cast of `'…+05:00'` to a zone-less timestamp is
/// its UTC wall clock to DataFusion, the written one to Postgres), and an
/// instant written as the UTC wall clock read back as UTC (the unparser
/// writes it as a zone-less `TIMESTAMP`, which Postgres would read in the
/// session's zone). None when it does not fold.
fn time_constant(e: &Expr) -> Option<Expr> {
    use datafusion::common::ScalarValue;
    use datafusion::optimizer::simplify_expressions::ExprSimplifier;
    let simplifier =
        ExprSimplifier::new(datafusion::logical_expr::simplify::SimplifyContext::default());
    let Ok(Expr::Literal(v, _)) = simplifier.simplify(e.clone()) else {
        return None;
    };
    let naive = match v {
        ScalarValue::TimestampSecond(x, Some(_)) => ScalarValue::TimestampSecond(x, None),
        ScalarValue::TimestampMillisecond(x, Some(_)) => ScalarValue::TimestampMillisecond(x, None),
        ScalarValue::TimestampMicrosecond(x, Some(_)) => ScalarValue::TimestampMicrosecond(x, None),
        ScalarValue::TimestampNanosecond(x, Some(_)) => ScalarValue::TimestampNanosecond(x, None),
        other => return Some(lit(other)),
    };
    Some(pg_timezone("UTC", lit(naive)))
}

/// When one side is a timestamp with a zone and the other a zone-less time,
/// a date or a string: whether the zoned one is the left, its unit and zone.
fn mixed_zones(
    left: &Expr,
    right: &Expr,
    schema: &datafusion::common::DFSchemaRef,
) -> Option<(bool, TimeUnit, std::sync::Arc<str>)> {
    let zoneless = |e: &Expr| {
        matches!(
            e.get_type(schema.as_ref()),
            Ok(DataType::Timestamp(_, None)
                | DataType::Date32
                | DataType::Date64
                | DataType::Utf8
                | DataType::Utf8View
                | DataType::LargeUtf8)
        )
    };
    let zoned = |e: &Expr| match e.get_type(schema.as_ref()) {
        Ok(DataType::Timestamp(unit, Some(tz))) => Some((unit, tz)),
        _ => None,
    };
    match (zoned(left), zoned(right)) {
        (Some((unit, tz)), None) if zoneless(right) => Some((true, unit, tz)),
        (None, Some((unit, tz))) if zoneless(left) => Some((false, unit, tz)),
        _ => None,
    }
}

/// `e` (a zone-less time, a date or a string) given zone `tz`, as DataFusion
/// casts it: a constant folded by DataFusion, anything else as the wall
/// clock of `tz`. A string that is not constant is left to Postgres.
fn in_zone(
    e: Expr,
    unit: TimeUnit,
    tz: &std::sync::Arc<str>,
    schema: &datafusion::common::DFSchemaRef,
) -> Expr {
    let zoned = cast(e.clone(), DataType::Timestamp(unit, Some(tz.clone())));
    if e.column_refs().is_empty()
        && let Some(folded) = time_constant(&zoned)
    {
        return folded;
    }
    match e.get_type(schema.as_ref()) {
        Ok(DataType::Timestamp(..) | DataType::Date32 | DataType::Date64) => {
            pg_timezone(tz, cast(e, DataType::Timestamp(unit, None)))
        }
        _ => e,
    }
}

/// `+05:45`, `-0300`, `+05` as seconds east of UTC.
fn fixed_offset_secs(zone: &str) -> Option<i64> {
    let (sign, rest) = match zone.as_bytes().first()? {
        b'+' => (1, &zone[1..]),
        b'-' => (-1, &zone[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if !matches!(digits.len(), 2 | 4) || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let h: i64 = digits[..2].parse().ok()?;
    let m: i64 = digits.get(2..).map_or(Some(0), |d| d.parse().ok())?;
    Some(sign * (h * 3600 + m * 60))
}

/// Postgres' `timezone(zone, e)`, that is `e AT TIME ZONE zone`: an instant
/// to its wall-clock time in `zone`, or a wall-clock time read in `zone`
/// back to an instant. A fixed offset goes as an interval: as a text,
/// Postgres would read `+05:45` the POSIX way, west of Greenwich. Only ever
/// written out into a view, never run here.
fn pg_timezone(zone: &str, e: Expr) -> Expr {
    let zone_arg = if super::utc::is_utc(zone) {
        lit("UTC")
    } else if let Some(secs) = fixed_offset_secs(zone) {
        lit(datafusion::common::ScalarValue::IntervalMonthDayNano(Some(
            datafusion::arrow::datatypes::IntervalMonthDayNano::new(0, 0, secs * 1_000_000_000),
        )))
    } else {
        lit(zone)
    };
    Expr::ScalarFunction(datafusion::logical_expr::expr::ScalarFunction::new_udf(
        std::sync::Arc::new(datafusion::logical_expr::ScalarUDF::new_from_impl(
            PgTimezone::new(zone),
        )),
        vec![zone_arg, e],
    ))
}

/// See [`pg_timezone`]. Its return type is Postgres': `timestamptz` to
/// `timestamp` and back, so that the expressions around it type-check.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PgTimezone {
    zone: std::sync::Arc<str>,
    signature: datafusion::logical_expr::Signature,
}

impl PgTimezone {
    fn new(zone: &str) -> Self {
        PgTimezone {
            zone: zone.into(),
            signature: datafusion::logical_expr::Signature::any(2, Volatility::Immutable),
        }
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for PgTimezone {
    fn name(&self) -> &str {
        "timezone"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> datafusion::common::Result<DataType> {
        match args.get(1) {
            Some(DataType::Timestamp(unit, Some(_))) => Ok(DataType::Timestamp(*unit, None)),
            Some(DataType::Timestamp(unit, None)) => {
                Ok(DataType::Timestamp(*unit, Some(self.zone.clone())))
            }
            other => datafusion::common::plan_err!("timezone() of {other:?}"),
        }
    }

    fn invoke_with_args(
        &self,
        _args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> datafusion::common::Result<datafusion::logical_expr::ColumnarValue> {
        datafusion::common::not_impl_err!("timezone() is only written out into Postgres views")
    }
}
