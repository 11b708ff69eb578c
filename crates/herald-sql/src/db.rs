//! The few sqlx operations the generic code needs, behind one trait every sqlx database with the
//! usual types implements (a blanket impl): the trait bounds are written here once.

use futures_util::future::BoxFuture;
use sqlx::query::Query;
use sqlx::{
    AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type,
};

/// A sqlx database herald can store into: it binds and reads integers, text and bytes, and its
/// connections execute queries. Implemented for every such database; nothing to implement.
pub trait SqlDb: Database {
    /// Runs `q` on `conn`.
    fn run<'c>(
        conn: &'c mut Self::Connection,
        q: Query<'static, Self, Self::Arguments>,
    ) -> BoxFuture<'c, Result<Self::QueryResult, sqlx::Error>>;
    /// Runs `q` on `conn` and returns its rows.
    fn rows<'c>(
        conn: &'c mut Self::Connection,
        q: Query<'static, Self, Self::Arguments>,
    ) -> BoxFuture<'c, Result<Vec<Self::Row>, sqlx::Error>>;
    /// Binds an integer.
    fn bind_i64(
        q: Query<'static, Self, Self::Arguments>,
        v: i64,
    ) -> Query<'static, Self, Self::Arguments>;
    /// Binds text.
    fn bind_text(
        q: Query<'static, Self, Self::Arguments>,
        v: &str,
    ) -> Query<'static, Self, Self::Arguments>;
    /// Binds text or `NULL`.
    fn bind_opt_text(
        q: Query<'static, Self, Self::Arguments>,
        v: Option<&str>,
    ) -> Query<'static, Self, Self::Arguments>;
    /// Binds bytes.
    fn bind_bytes(
        q: Query<'static, Self, Self::Arguments>,
        v: &[u8],
    ) -> Query<'static, Self, Self::Arguments>;
    /// Reads an integer column.
    fn get_i64(row: &Self::Row, col: &str) -> Result<i64, sqlx::Error>;
    /// Reads the integer in column `index` (from 0).
    fn get_i64_at(row: &Self::Row, index: usize) -> Result<i64, sqlx::Error>;
    /// Reads an integer column that may be `NULL`.
    fn get_opt_i64(row: &Self::Row, col: &str) -> Result<Option<i64>, sqlx::Error>;
    /// Reads a 32-bit integer column.
    fn get_i32(row: &Self::Row, col: &str) -> Result<i32, sqlx::Error>;
    /// Reads a text column.
    fn get_text(row: &Self::Row, col: &str) -> Result<String, sqlx::Error>;
    /// Reads a text column that may be `NULL`.
    fn get_opt_text(row: &Self::Row, col: &str) -> Result<Option<String>, sqlx::Error>;
    /// Reads a bytes column.
    fn get_bytes(row: &Self::Row, col: &str) -> Result<Vec<u8>, sqlx::Error>;
    /// Reads a bytes column that may be `NULL`.
    fn get_opt_bytes(row: &Self::Row, col: &str) -> Result<Option<Vec<u8>>, sqlx::Error>;
    /// A column's bytes whatever its declared type (`None` for `NULL` or an unreadable value):
    /// for reports on what a producer managed to store.
    fn get_raw_bytes(row: &Self::Row, col: &str) -> Option<Vec<u8>>;
}

impl<DB> SqlDb for DB
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
    usize: ColumnIndex<DB::Row>,
    i64: Type<DB> + for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB>,
    i32: Type<DB> + for<'r> Decode<'r, DB>,
    String: Type<DB> + for<'r> Decode<'r, DB>,
    Vec<u8>: Type<DB> + for<'r> Decode<'r, DB>,
    for<'a> &'a str: Type<DB> + Encode<'a, DB>,
    for<'a> Option<&'a str>: Type<DB> + Encode<'a, DB>,
    for<'a> &'a [u8]: Type<DB> + Encode<'a, DB>,
{
    fn run<'c>(
        conn: &'c mut Self::Connection,
        q: Query<'static, Self, Self::Arguments>,
    ) -> BoxFuture<'c, Result<Self::QueryResult, sqlx::Error>> {
        Box::pin(async move { q.execute(conn).await })
    }

    fn rows<'c>(
        conn: &'c mut Self::Connection,
        q: Query<'static, Self, Self::Arguments>,
    ) -> BoxFuture<'c, Result<Vec<Self::Row>, sqlx::Error>> {
        Box::pin(async move { q.fetch_all(conn).await })
    }

    fn bind_i64(
        q: Query<'static, Self, Self::Arguments>,
        v: i64,
    ) -> Query<'static, Self, Self::Arguments> {
        q.bind(v)
    }

    fn bind_text(
        q: Query<'static, Self, Self::Arguments>,
        v: &str,
    ) -> Query<'static, Self, Self::Arguments> {
        q.bind(v)
    }

    fn bind_opt_text(
        q: Query<'static, Self, Self::Arguments>,
        v: Option<&str>,
    ) -> Query<'static, Self, Self::Arguments> {
        q.bind(v)
    }

    fn bind_bytes(
        q: Query<'static, Self, Self::Arguments>,
        v: &[u8],
    ) -> Query<'static, Self, Self::Arguments> {
        q.bind(v)
    }

    fn get_i64(row: &Self::Row, col: &str) -> Result<i64, sqlx::Error> {
        row.try_get(col)
    }

    fn get_i64_at(row: &Self::Row, index: usize) -> Result<i64, sqlx::Error> {
        row.try_get(index)
    }

    fn get_opt_i64(row: &Self::Row, col: &str) -> Result<Option<i64>, sqlx::Error> {
        row.try_get(col)
    }

    fn get_i32(row: &Self::Row, col: &str) -> Result<i32, sqlx::Error> {
        row.try_get(col)
    }

    fn get_text(row: &Self::Row, col: &str) -> Result<String, sqlx::Error> {
        row.try_get(col)
    }

    fn get_opt_text(row: &Self::Row, col: &str) -> Result<Option<String>, sqlx::Error> {
        row.try_get(col)
    }

    fn get_bytes(row: &Self::Row, col: &str) -> Result<Vec<u8>, sqlx::Error> {
        row.try_get(col)
    }

    fn get_opt_bytes(row: &Self::Row, col: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
        row.try_get(col)
    }

    fn get_raw_bytes(row: &Self::Row, col: &str) -> Option<Vec<u8>> {
        if let Ok(Some(b)) = row.try_get::<Option<Vec<u8>>, _>(col) {
            return Some(b);
        }
        row.try_get_unchecked::<Option<Vec<u8>>, _>(col)
            .ok()
            .flatten()
    }
}

/// One statement with its values, built in bind order:
/// `Stmt::<DB>::new(sql).int(id).text(reason).execute(&mut conn)`.
pub struct Stmt<DB: SqlDb> {
    q: Query<'static, DB, DB::Arguments>,
}

impl<DB: SqlDb> Stmt<DB> {
    /// A statement of `sql` (already in the database's placeholder style).
    pub fn new(sql: &str) -> Stmt<DB> {
        Stmt {
            q: sqlx::query(AssertSqlSafe(sql.to_owned())),
        }
    }

    /// Binds an integer.
    pub fn int(self, v: i64) -> Stmt<DB> {
        Stmt {
            q: DB::bind_i64(self.q, v),
        }
    }

    /// Binds text.
    pub fn text(self, v: &str) -> Stmt<DB> {
        Stmt {
            q: DB::bind_text(self.q, v),
        }
    }

    /// Binds text or `NULL`.
    pub fn opt_text(self, v: Option<&str>) -> Stmt<DB> {
        Stmt {
            q: DB::bind_opt_text(self.q, v),
        }
    }

    /// Binds bytes.
    pub fn bytes(self, v: &[u8]) -> Stmt<DB> {
        Stmt {
            q: DB::bind_bytes(self.q, v),
        }
    }

    /// Binds with sqlx directly, for a value only one database knows (a PostgreSQL array).
    pub fn with(
        self,
        bind: impl FnOnce(Query<'static, DB, DB::Arguments>) -> Query<'static, DB, DB::Arguments>,
    ) -> Stmt<DB> {
        Stmt { q: bind(self.q) }
    }

    /// Binds each of `values` as an integer.
    pub fn ints(mut self, values: &[i64]) -> Stmt<DB> {
        for v in values {
            self = self.int(*v);
        }
        self
    }

    /// Binds each of `values` as text.
    pub fn texts<S: AsRef<str>>(mut self, values: &[S]) -> Stmt<DB> {
        for v in values {
            self = self.text(v.as_ref());
        }
        self
    }

    /// Runs the statement.
    pub async fn execute(self, conn: &mut DB::Connection) -> Result<DB::QueryResult, sqlx::Error> {
        DB::run(conn, self.q).await
    }

    /// Runs the statement and returns its rows.
    pub async fn fetch_all(self, conn: &mut DB::Connection) -> Result<Vec<DB::Row>, sqlx::Error> {
        DB::rows(conn, self.q).await
    }

    /// Runs the statement and returns its first row, if any.
    pub async fn fetch_optional(
        self,
        conn: &mut DB::Connection,
    ) -> Result<Option<DB::Row>, sqlx::Error> {
        Ok(DB::rows(conn, self.q).await?.into_iter().next())
    }
}

/// A column read as text whatever its type, lossily where it is not UTF-8 (`NULL` and values of
/// other types read as empty): for reports, never for messages.
pub fn lossy_text<DB: SqlDb>(row: &DB::Row, col: &str) -> String {
    if let Ok(Some(s)) = DB::get_opt_text(row, col) {
        return s;
    }
    DB::get_raw_bytes(row, col)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
