//! Flow history in ClickHouse: one schema, one SQL dialect, two backends.
//!
//! - **Embedded** (the default for one machine): ClickHouse's engine in this process
//!   through chDB ([`chdb`]), with its data in a directory.
//! - **Server**: any ClickHouse server or cluster, over HTTP with RowBinary through the
//!   `clickhouse` crate, schema validation on.
//!
//! [`Store`] creates and migrates the schema ([`schema`]), inserts [`row::FlowRow`]s, and
//! answers the audit ([`audit`]) and history queries with the same SQL on both. This is
//! the only crate that talks to ClickHouse.

pub mod attempts;
pub mod audit;
pub mod chdb;
pub mod row;
pub mod schema;
mod sql;
pub mod synthetic;

use std::path::PathBuf;

use chdb::Lane;

pub use attempts::{AttemptQuery, AttemptRow, AttemptSide};
pub use audit::{AuditQuery, AuditRow};
pub use row::FlowRow;
pub use schema::Retention;

/// Which stored flows to read: FlowFilter allow and deny lists (as `flows observe`
/// takes them), a time window, and how many of the first or last ones.
#[derive(Debug, Clone, Default)]
pub struct FlowQuery {
    pub allow: Vec<flows_proto::FlowFilter>,
    pub deny: Vec<flows_proto::FlowFilter>,
    /// Nanoseconds since the epoch, inclusive.
    pub since: Option<i64>,
    /// Nanoseconds since the epoch, exclusive.
    pub until: Option<i64>,
    /// At most this many flows (0: all).
    pub number: u64,
    /// The last `number` ones rather than the first (still returned oldest first).
    pub last: bool,
}

/// Bounds on what one read for a client (flows, audit, attempts) may cost ClickHouse and
/// the relay. A result over `max_rows` is an error that says so (`StoreError::TooMany`),
/// never a silent cut; ClickHouse stops a read over its time or memory bound itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Rows one read returns at most (flows, or audit and attempt groups).
    pub max_rows: u64,
    /// Seconds ClickHouse may spend on one read.
    pub max_seconds: u64,
    /// Bytes of memory ClickHouse may use for one read.
    pub max_memory: u64,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_rows: 100_000,
            max_seconds: 60,
            max_memory: 2 << 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ClickHouse engine: {message}")]
    Engine { message: String },
    #[error("ClickHouse server at {url}: {message}")]
    Server { url: String, message: String },
    #[error("ClickHouse server at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("query failed: {message} (query: {query})")]
    Query { message: String, query: String },
    #[error("unexpected answer from ClickHouse: {message}")]
    Decode { message: String },
    #[error("invalid filter for the store: {message}")]
    Filter { message: String },
    #[error("more than {limit} rows match in the store: narrow the time window or the filters")]
    TooMany { limit: u64 },
    #[error(
        "database {db} has schema version {found}, newer than the {known} this build knows: \
         it was written by a newer flows; run that version (or newer) instead of this one"
    )]
    SchemaTooNew { db: String, found: u32, known: u32 },
}

/// ClickHouse's codes for "this data cannot go in as it is": bad values, a constraint,
/// a column or table that is not there. Trying the same batch again cannot help.
const REFUSAL_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    8,   // THERE_IS_NO_COLUMN
    16,  // NO_SUCH_COLUMN_IN_TABLE
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    81,  // UNKNOWN_DATABASE
    117, // INCORRECT_DATA
    469, // VIOLATED_CONSTRAINT
];

impl StoreError {
    /// An error of the place the store is (a server down, refusing or failing, which
    /// may pass), not of flows' configuration or of the data in the store.
    pub fn is_of_the_server(&self) -> bool {
        matches!(self, StoreError::Server { .. } | StoreError::Unreachable { .. })
    }

    /// The store answered that it will not take this data (a constraint, bad values, a
    /// missing table): trying the same rows again cannot succeed. Not for errors that
    /// pass (unreachable, overloaded, out of memory, too many parts).
    pub fn is_refusal(&self) -> bool {
        let message = match self {
            StoreError::Engine { message } | StoreError::Server { message, .. } | StoreError::Query { message, .. } => message,
            _ => return false,
        };
        clickhouse_code(message).is_some_and(|c| REFUSAL_CODES.contains(&c))
    }

    /// What a client may be told: its own filter's fault or the limit its question hit,
    /// in full; of anything else only that the store failed. ClickHouse's messages
    /// quote SQL and server internals: they stay in the log of whoever holds the store.
    pub fn public_message(&self) -> String {
        match self {
            StoreError::Filter { .. } | StoreError::TooMany { .. } | StoreError::SchemaTooNew { .. } => self.to_string(),
            StoreError::Server { .. } => "the ClickHouse server failed to answer (details in the relay's log)".into(),
            StoreError::Unreachable { .. } => "the ClickHouse server is unreachable (details in the relay's log)".into(),
            _ => "the store failed to answer (details in the relay's log)".into(),
        }
    }
}

/// Where the flows are kept.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    /// chDB in this process, data in `path`.
    Embedded { path: PathBuf, library: PathBuf },
    /// A ClickHouse server: `url` like `http://127.0.0.1:8123`.
    Server {
        url: String,
        user: Option<String>,
        password: Option<String>,
    },
}

enum Backend {
    /// The engine, and a directory for the files inserts are read from.
    Embedded(chdb::Engine, PathBuf),
    Server { client: clickhouse::Client, url: String },
}

pub struct Store {
    backend: Backend,
    db: String,
    limits: ReadLimits,
}

/// The flows of a large read, a slice of time at a time: each page is the matching flows
/// of the next slice, in time order, at most `page_rows` of them; a slice holding more
/// is narrowed before it is read, a sparse one widened after. What one page costs is
/// bounded however much the whole read returns: the relay streams a read of 100
/// million rows in the memory of a page.
#[derive(Debug, Clone)]
pub struct FlowPages {
    cond: String,
    /// Where the next slice starts, and where the read ends (nanoseconds, exclusive).
    next: i64,
    end: i64,
    span: i64,
    page_rows: u64,
}

impl FlowPages {
    const FIRST_SPAN: i64 = 60_000_000_000;
    const MAX_SPAN: i64 = 86_400_000_000_000;

    /// The next page; None when the read is done.
    pub async fn next_page(&mut self, store: &Store) -> Result<Option<Vec<flows_proto::Flow>>, StoreError> {
        while self.next < self.end {
            let hi = self.next.saturating_add(self.span).min(self.end);
            // A slice of one nanosecond is taken whole, up to the read bound.
            let narrowest = hi - self.next <= 1;
            let lim = if narrowest { store.limits.max_rows } else { self.page_rows } + 1;
            let q = format!(
                "SELECT * FROM {}.flows WHERE {} AND {} ORDER BY time LIMIT {lim}{}",
                store.db,
                self.cond,
                sql::time_range(Some(self.next), Some(hi)),
                sql::read_settings(&store.limits),
            );
            let bytes = store.fetch(&q, "RowBinary").await?;
            let mut rest = bytes.as_slice();
            let mut out = Vec::new();
            while !rest.is_empty() {
                out.push(FlowRow::decode(&mut rest)?.to_flow());
            }
            if out.len() as u64 >= lim {
                if narrowest {
                    return Err(StoreError::TooMany { limit: store.limits.max_rows });
                }
                // Too dense: the same start, an eighth of the span.
                self.span = ((hi - self.next) / 8).max(1);
                continue;
            }
            self.next = hi;
            // Sparse (an empty slice always is): four times as wide next time.
            if out.len() as u64 <= self.page_rows / 8 {
                self.span = self.span.saturating_mul(4).min(FlowPages::MAX_SPAN);
            }
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
        Ok(None)
    }
}

/// What the store holds of one node's newest flows ([`Store::resume_marks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMark {
    pub node: String,
    /// Its newest stored flow's time, nanoseconds (the node's clock).
    pub newest: i64,
    /// Ids of its flows stored within the margin before `newest`.
    pub uuids: Vec<String>,
}

/// Tables' sizes on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub rows: u64,
    pub bytes_on_disk: u64,
    pub bytes_uncompressed: u64,
}

impl StoreConfig {
    /// `embedded:DIR` or `http(s)://host:port`, as the command lines take it.
    pub fn parse(
        spec: &str,
        library: PathBuf,
        user: Option<String>,
        password: Option<String>,
    ) -> Result<StoreConfig, StoreError> {
        if let Some(dir) = spec.strip_prefix("embedded:") {
            Ok(StoreConfig::Embedded { path: dir.into(), library })
        } else if spec.starts_with("http://") || spec.starts_with("https://") {
            Ok(StoreConfig::Server { url: spec.to_string(), user, password })
        } else {
            Err(StoreError::Engine {
                message: format!("store {spec:?}: expected embedded:DIR or http(s)://host:port"),
            })
        }
    }
}

impl Store {
    /// Connects (or opens the engine) and brings the schema up to date.
    pub async fn open(config: &StoreConfig, db: &str, retention: Retention) -> Result<Store, StoreError> {
        let store = Store::connect(config, db)?;
        store.migrate(retention).await?;
        Ok(store)
    }

    /// Opens an existing store to read it: no schema change, retention left as it is.
    pub async fn open_existing(config: &StoreConfig, db: &str) -> Result<Store, StoreError> {
        let store = Store::connect(config, db)?;
        let v = store.schema_version().await?;
        store.refuse_newer(v)?;
        if v == 0 {
            return Err(StoreError::Engine {
                message: format!("database {db} holds no flows (no schema)"),
            });
        }
        Ok(store)
    }

    /// Connects without touching the schema: tests that build an older one, and tools
    /// that inspect a store as it is.
    pub fn open_unmigrated(config: &StoreConfig, db: &str) -> Result<Store, StoreError> {
        Store::connect(config, db)
    }

    fn connect(config: &StoreConfig, db: &str) -> Result<Store, StoreError> {
        if db.is_empty() || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(StoreError::Engine {
                message: format!("database name {db:?}: letters, digits and _ only"),
            });
        }
        let backend = match config {
            StoreConfig::Embedded { path, library } => {
                let spool = path.join("ingest");
                std::fs::create_dir_all(&spool).map_err(|e| StoreError::Engine {
                    message: format!("creating {}: {e}", spool.display()),
                })?;
                Backend::Embedded(chdb::Engine::open(library, path)?, spool)
            }
            StoreConfig::Server { url, user, password } => {
                let mut client = clickhouse::Client::default().with_url(url.clone()).with_validation(true);
                if let Some(u) = user {
                    client = client.with_user(u.clone());
                }
                if let Some(p) = password {
                    client = client.with_password(p.clone());
                }
                Backend::Server {
                    client,
                    url: url.clone(),
                }
            }
        };
        Ok(Store {
            backend,
            db: db.to_string(),
            limits: ReadLimits::default(),
        })
    }

    /// The bounds of every read for a client from now on.
    pub fn with_read_limits(mut self, limits: ReadLimits) -> Store {
        self.limits = limits;
        self
    }

    pub fn read_limits(&self) -> ReadLimits {
        self.limits
    }

    /// The first `take` rows (0: all) of a client's read (`sql` without LIMIT or
    /// SETTINGS) under the read limits: more than `max_rows` of them is `TooMany`.
    pub(crate) async fn bounded_json(&self, sql: &str, take: u64) -> Result<Vec<serde_json::Value>, StoreError> {
        let l = self.limits;
        // One row past the bound tells "too many" from "exactly the bound".
        let lim = if take > 0 { take.min(l.max_rows.saturating_add(1)) } else { l.max_rows.saturating_add(1) };
        let rows = self.select_json(&format!("{sql} LIMIT {lim}{}", sql::read_settings(&l))).await?;
        if rows.len() as u64 > l.max_rows {
            return Err(StoreError::TooMany { limit: l.max_rows });
        }
        Ok(rows)
    }

    pub fn database(&self) -> &str {
        &self.db
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self.backend, Backend::Embedded(..))
    }

    fn server_err(url: &str, e: clickhouse::error::Error) -> StoreError {
        let (url, message) = (url.to_string(), e.to_string());
        match e {
            clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut => StoreError::Unreachable { url, message },
            _ => StoreError::Server { url, message },
        }
    }

    /// Runs a statement that returns nothing.
    pub async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(e, _) => e.query(Lane::Write, sql.as_bytes().to_vec(), "TabSeparated").await.map(|_| ()),
            Backend::Server { client, url } => client
                .query(sql)
                .execute()
                .await
                .map_err(|e| Store::server_err(url, e)),
        }
    }

    /// Runs a query and returns its output in `format`.
    pub async fn fetch(&self, sql: &str, format: &str) -> Result<Vec<u8>, StoreError> {
        match &self.backend {
            Backend::Embedded(e, _) => e.query(Lane::Read, sql.as_bytes().to_vec(), format).await,
            Backend::Server { client, url } => {
                let mut cursor = client
                    .query(sql)
                    .fetch_bytes(format)
                    .map_err(|e| Store::server_err(url, e))?;
                let bytes = cursor.collect().await.map_err(|e| Store::server_err(url, e))?;
                Ok(bytes.to_vec())
            }
        }
    }

    /// Rows as JSON objects (JSONEachRow).
    pub async fn select_json(&self, sql: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let out = self.fetch(sql, "JSONEachRow").await?;
        out.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice(l).map_err(|e| StoreError::Decode {
                    message: format!("{e}: {}", String::from_utf8_lossy(&l[..l.len().min(200)])),
                })
            })
            .collect()
    }

    async fn migrate(&self, retention: Retention) -> Result<(), StoreError> {
        for s in schema::bootstrap(&self.db) {
            self.execute(&s).await?;
        }
        let applied = self
            .select_json(&format!("SELECT max(version) AS v FROM {}.schema_migrations", self.db))
            .await?;
        let current = applied
            .first()
            .and_then(|r| r["v"].as_u64())
            .unwrap_or(0);
        // A newer relay's columns and tables mean nothing to this one, and its inserts
        // would fail row by row: refuse before writing anything.
        self.refuse_newer(u32::try_from(current).unwrap_or(u32::MAX))?;
        for (version, statements) in schema::migrations(&self.db) {
            if u64::from(version) <= current {
                continue;
            }
            for s in statements {
                self.execute(&s).await?;
            }
            self.execute(&format!(
                "INSERT INTO {}.schema_migrations (version) VALUES ({version})",
                self.db
            ))
            .await?;
            tracing::info!(version, db = %self.db, "store schema migrated");
        }
        for (table, days, statement) in schema::retention(&self.db, retention) {
            let current = self
                .select_json(&format!(
                    "SELECT create_table_query AS q FROM system.tables WHERE database = '{}' AND name = '{table}'",
                    self.db
                ))
                .await?;
            let q = current.first().and_then(|r| r["q"].as_str()).unwrap_or_default();
            if !q.contains(&format!("toIntervalDay({days})")) {
                self.execute(&statement).await?;
                tracing::info!(table, days, "store retention set");
            }
        }
        Ok(())
    }

    /// Refuses a schema written by a newer build.
    fn refuse_newer(&self, found: u32) -> Result<(), StoreError> {
        let known = schema::LATEST;
        if found > known {
            return Err(StoreError::SchemaTooNew { db: self.db.clone(), found, known });
        }
        Ok(())
    }

    /// The schema version in force.
    pub async fn schema_version(&self) -> Result<u32, StoreError> {
        let r = self
            .select_json(&format!("SELECT max(version) AS v FROM {}.schema_migrations", self.db))
            .await?;
        Ok(r.first().and_then(|r| r["v"].as_u64()).unwrap_or(0) as u32)
    }

    /// Inserts one batch; all of it or, on error, none of it (one INSERT). Inserting the
    /// same batch again (a retry after a lost answer) writes nothing: the batch carries a
    /// deduplication token made from its flows' ids.
    pub async fn insert(&self, rows: &[FlowRow]) -> Result<(), StoreError> {
        self.insert_into("flows", rows).await
    }

    /// The deduplication token of a batch: its first and last flow ids and its length
    /// (flow ids are unique, and a batch is always retried whole).
    fn dedup_token(rows: &[FlowRow]) -> String {
        let first = rows.first().map(|r| r.uuid.as_str()).unwrap_or_default();
        let last = rows.last().map(|r| r.uuid.as_str()).unwrap_or_default();
        let token = format!("{first}:{last}:{}", rows.len());
        // Only characters that need no quoting in either transport.
        token.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.')).collect()
    }

    /// Inserts rows into `table` of the store's database (a table with the columns of
    /// `flows`: benchmarks compare against a bare one).
    pub async fn insert_into(&self, table: &str, rows: &[FlowRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        match &self.backend {
            Backend::Embedded(e, spool) => {
                // Rows go through a file: binary data inside the query text is split by
                // the engine's statement parser.
                let mut data = Vec::with_capacity(rows.len() * 512);
                for r in rows {
                    r.encode(&mut data);
                }
                let file = spool.join(format!("{table}-{}.bin", INSERTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
                std::fs::write(&file, &data).map_err(|e| StoreError::Engine {
                    message: format!("writing {}: {e}", file.display()),
                })?;
                let q = format!(
                    "INSERT INTO {}.{table} FROM INFILE {} SETTINGS insert_deduplication_token = {}, deduplicate_blocks_in_dependent_materialized_views = 1 FORMAT RowBinary",
                    self.db,
                    sql::quote(&file.display().to_string()),
                    sql::quote(&Store::dedup_token(rows))
                );
                let out = e.query(Lane::Write, q.into_bytes(), "TabSeparated").await.map(|_| ());
                let _ = std::fs::remove_file(&file);
                out
            }
            Backend::Server { client, url } => {
                // The client names the table as one identifier: the database is set
                // on the request instead.
                let mut ins = client
                    .clone()
                    .with_database(self.db.clone())
                    .with_setting("insert_deduplication_token", Store::dedup_token(rows))
                    .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1")
                    .insert::<FlowRow>(table)
                    .await
                    .map_err(|e| Store::server_err(url, e))?;
                for r in rows {
                    ins.write(r).await.map_err(|e| Store::server_err(url, e))?;
                }
                ins.end().await.map_err(|e| Store::server_err(url, e))
            }
        }
    }

    /// The flows a [`FlowQuery`] asks for, oldest first.
    pub async fn flows(&self, query: &FlowQuery) -> Result<Vec<flows_proto::Flow>, StoreError> {
        let newest = query.last;
        let order = if newest { "DESC" } else { "ASC" };
        let l = self.limits;
        // Asked for more than a read may return, or for all of them: one row past the
        // bound tells "too many" from "exactly the bound".
        if query.number > l.max_rows {
            return Err(StoreError::TooMany { limit: l.max_rows });
        }
        let lim = if query.number > 0 { query.number } else { l.max_rows.saturating_add(1) };
        let q = format!(
            "SELECT * FROM {}.flows WHERE {} AND {} ORDER BY time {order} LIMIT {lim}{}",
            self.db,
            sql::condition(&query.allow, &query.deny)?,
            sql::time_range(query.since, query.until),
            sql::read_settings(&l),
        );
        let bytes = self.fetch(&q, "RowBinary").await?;
        let mut rest = bytes.as_slice();
        let mut out = Vec::new();
        while !rest.is_empty() {
            if out.len() as u64 >= l.max_rows {
                return Err(StoreError::TooMany { limit: l.max_rows });
            }
            out.push(FlowRow::decode(&mut rest)?.to_flow());
        }
        if newest {
            out.reverse();
        }
        Ok(out)
    }

    /// A read too large to hold at once, in pages ([`FlowPages`]): every flow the
    /// query matches (its `number` and `last` are not used), oldest first.
    pub async fn flow_pages(&self, query: &FlowQuery, page_rows: u64) -> Result<FlowPages, StoreError> {
        let cond = sql::condition(&query.allow, &query.deny)?;
        let r = self
            .select_json(&format!(
                "SELECT toUnixTimestamp64Nano(min(time)) AS lo, toUnixTimestamp64Nano(max(time)) AS hi, count() AS n \
                 FROM {}.flows WHERE {cond} AND {}{}",
                self.db,
                sql::time_range(query.since, query.until),
                sql::read_settings(&self.limits),
            ))
            .await?;
        let row = r.first().cloned().unwrap_or_default();
        let n = json_u64(&row["n"]).unwrap_or(0);
        let (lo, hi) = (json_i64(&row["lo"]).unwrap_or(0), json_i64(&row["hi"]).unwrap_or(0));
        Ok(FlowPages {
            cond,
            next: if n == 0 { 0 } else { lo },
            end: if n == 0 { 0 } else { hi.saturating_add(1) },
            span: FlowPages::FIRST_SPAN,
            page_rows: page_rows.max(1),
        })
    }

    /// The newest flow's time (nanoseconds), if any: where ingest resumes after a restart.
    pub async fn last_time(&self) -> Result<Option<i64>, StoreError> {
        let r = self
            .select_json(&format!(
                "SELECT toUnixTimestamp64Nano(max(time)) AS t, count() AS n FROM {}.flows",
                self.db
            ))
            .await?;
        let row = r.first();
        let n = row.and_then(|r| json_u64(&r["n"])).unwrap_or(0);
        Ok(if n == 0 {
            None
        } else {
            row.and_then(|r| json_u64(&r["t"])).map(|t| t as i64)
        })
    }

    /// Each node's newest stored flow, and the ids of its flows stored within `margin_ns`
    /// before it: where the relay's writer resumes that node after a restart (each node
    /// on its own clock), and what it must not write twice.
    pub async fn resume_marks(&self, margin_ns: i64) -> Result<Vec<NodeMark>, StoreError> {
        let rows = self
            .select_json(&format!(
                "SELECT f.node AS node, toUnixTimestamp64Nano(max(f.time)) AS newest, groupArray(f.uuid) AS uuids \
                 FROM {db}.flows AS f INNER JOIN (SELECT node, max(time) AS m FROM {db}.flows GROUP BY node) AS n \
                 ON f.node = n.node WHERE f.time >= n.m - toIntervalNanosecond({margin}) GROUP BY f.node",
                db = self.db,
                margin = margin_ns.max(0),
            ))
            .await?;
        rows.into_iter()
            .map(|r| {
                let bad = || StoreError::Decode { message: format!("resume mark: {r}") };
                Ok(NodeMark {
                    node: r["node"].as_str().ok_or_else(bad)?.to_string(),
                    newest: json_u64(&r["newest"]).ok_or_else(bad)? as i64,
                    uuids: r["uuids"]
                        .as_array()
                        .ok_or_else(bad)?
                        .iter()
                        .filter_map(|u| u.as_str().map(str::to_string))
                        .collect(),
                })
            })
            .collect()
    }

    /// Active parts of the raw table: rows and bytes, compressed and not.
    pub async fn disk_usage(&self) -> Result<DiskUsage, StoreError> {
        let r = self
            .select_json(&format!(
                "SELECT sum(rows) AS rows, sum(bytes_on_disk) AS disk, sum(data_uncompressed_bytes) AS raw \
                 FROM system.parts WHERE database = '{}' AND table = 'flows' AND active",
                self.db
            ))
            .await?;
        let row = r.first().cloned().unwrap_or_default();
        Ok(DiskUsage {
            rows: json_u64(&row["rows"]).unwrap_or(0),
            bytes_on_disk: json_u64(&row["disk"]).unwrap_or(0),
            bytes_uncompressed: json_u64(&row["raw"]).unwrap_or(0),
        })
    }

    /// Forces pending merges and TTL deletions now (tests, and after a retention change).
    pub async fn optimize(&self) -> Result<(), StoreError> {
        for t in ["flows", "flows_1m", "flows_1h"] {
            self.execute(&format!("OPTIMIZE TABLE {}.{t} FINAL", self.db)).await?;
        }
        Ok(())
    }
}

/// The error code in a ClickHouse message ("Code: 469. DB::Exception: ...").
fn clickhouse_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Numbers the embedded store's insert files.
static INSERTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// ClickHouse's JSON output quotes 64-bit integers.
pub(crate) fn json_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

pub(crate) fn json_i64(v: &serde_json::Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_told_no_sql_and_no_internals() {
        let errors = [
            StoreError::Query { message: "Code: 62. Syntax error at SELECT secret".into(), query: "SELECT secret FROM flows.flows".into() },
            StoreError::Engine { message: "DB::Exception: SELECT * FROM flows.flows WHERE x".into() },
            StoreError::Server { url: "http://user:pw@ch:8123".into(), message: "Code: 60. Table flows.flows does not exist".into() },
            StoreError::Decode { message: "row: SELECT".into() },
        ];
        for e in errors {
            let m = e.public_message();
            assert!(!m.contains("SELECT") && !m.contains("flows.flows") && !m.contains("pw"), "{m}");
        }
        assert!(StoreError::Filter { message: "bad CIDR 10/40".into() }.public_message().contains("10/40"));
        assert!(StoreError::TooMany { limit: 7 }.public_message().contains('7'));
    }

    #[test]
    fn refusals_are_told_from_errors_that_pass() {
        let server = |m: &str| StoreError::Server { url: "http://ch:8123".into(), message: m.into() };
        assert!(server("bad response: Code: 469. DB::Exception: Constraint `c` is violated").is_refusal());
        assert!(StoreError::Engine { message: "Code: 53. DB::Exception: Type mismatch".into() }.is_refusal());
        for passing in [
            server("network error: connection refused"),
            server("bad response: Code: 252. DB::Exception: Too many parts"),
            server("bad response: Code: 241. DB::Exception: Memory limit exceeded"),
            server("timeout expired"),
            StoreError::Engine { message: "Code: 4690. not a refusal".into() },
        ] {
            assert!(!passing.is_refusal(), "{passing}");
        }
    }
}
