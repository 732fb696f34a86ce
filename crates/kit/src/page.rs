//! Pagination as every list endpoint does it: `?page=` (from 1) and `?per_page=` (1 to 100,
//! default 20), answered with `{items, page, per_page, total}`.

use serde::Serialize;

use crate::ApiError;

/// Rows per page when the client does not say.
pub const DEFAULT_PER_PAGE: u32 = 20;
/// The most rows a page may have.
pub const MAX_PER_PAGE: u32 = 100;

/// A validated page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pagination {
    pub page: u32,
    pub per_page: u32,
}

impl Pagination {
    /// From the query's `page` and `per_page`; 400 `invalid_query` when out of range.
    pub fn new(page: Option<u32>, per_page: Option<u32>) -> Result<Self, ApiError> {
        let page = page.unwrap_or(1);
        let per_page = per_page.unwrap_or(DEFAULT_PER_PAGE);
        if page == 0 || !(1..=MAX_PER_PAGE).contains(&per_page) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("page starts at 1; per_page must be 1 to {MAX_PER_PAGE}"),
            ));
        }
        Ok(Self { page, per_page })
    }

    /// SQL `limit`.
    pub fn limit(self) -> i64 {
        i64::from(self.per_page)
    }

    /// SQL `offset`.
    pub fn offset(self) -> i64 {
        i64::from(self.page - 1) * i64::from(self.per_page)
    }

    /// Names this page among the members of a cached list group.
    pub fn cache_field(self) -> String {
        format!("page={}&per_page={}", self.page, self.per_page)
    }

    /// The response body for this page.
    pub fn page<T>(self, items: Vec<T>, total: i64) -> Page<T> {
        Page {
            items,
            page: self.page,
            per_page: self.per_page,
            total,
        }
    }
}

/// One page of a list, in a stable order.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub page: u32,
    pub per_page: u32,
    /// Rows matching the request across all pages.
    pub total: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let p = Pagination::new(None, None).expect("defaults");
        assert_eq!((p.page, p.per_page, p.limit(), p.offset()), (1, 20, 20, 0));
        let p = Pagination::new(Some(3), Some(100)).expect("valid");
        assert_eq!((p.limit(), p.offset()), (100, 200));
        for (page, per_page) in [(Some(0), None), (None, Some(0)), (None, Some(101))] {
            let err = Pagination::new(page, per_page).expect_err("out of range");
            assert_eq!(err.problem().code, "invalid_query");
        }
    }
}
