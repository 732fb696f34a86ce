//! Pagination as every list endpoint does it: `?page=` (1 to 10,000) and `?per_page=` (1 to
//! 100, default 20), answered with `{items, page, per_page, total}`. A value out of range is 422
//! naming the field; one that is not a number is 400 (the query extractor's).

use serde::Serialize;

use crate::ApiError;
use crate::error::FieldError;

/// Rows per page when the client does not say.
pub const DEFAULT_PER_PAGE: u32 = 20;
/// The most rows a page may have.
pub const MAX_PER_PAGE: u32 = 100;
/// The deepest page: beyond it a client is walking the whole table (offsets cost the database
/// their size) or making up cache keys; filter instead.
pub const MAX_PAGE: u32 = 10_000;

/// A validated page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pagination {
    pub page: u32,
    pub per_page: u32,
}

impl Pagination {
    /// From the query's `page` and `per_page`; 422 naming each one out of range.
    pub fn new(page: Option<u32>, per_page: Option<u32>) -> Result<Self, ApiError> {
        let page = page.unwrap_or(1);
        let per_page = per_page.unwrap_or(DEFAULT_PER_PAGE);
        let mut errors = Vec::new();
        if !(1..=MAX_PAGE).contains(&page) {
            errors.push(FieldError::new(
                "page",
                "out_of_range",
                format!("must be 1 to {MAX_PAGE}"),
            ));
        }
        if !(1..=MAX_PER_PAGE).contains(&per_page) {
            errors.push(FieldError::new(
                "per_page",
                "out_of_range",
                format!("must be 1 to {MAX_PER_PAGE}"),
            ));
        }
        if errors.is_empty() {
            Ok(Self { page, per_page })
        } else {
            Err(ApiError::validation(errors))
        }
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
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
        let p = Pagination::new(Some(MAX_PAGE), Some(MAX_PER_PAGE)).expect("the deepest page");
        assert_eq!(p.offset(), 999_900);
        for (page, per_page, field) in [
            (Some(0), None, "page"),
            (Some(MAX_PAGE + 1), None, "page"),
            (Some(u32::MAX), None, "page"),
            (None, Some(0), "per_page"),
            (None, Some(101), "per_page"),
        ] {
            let err = Pagination::new(page, per_page).expect_err("out of range");
            let problem = err.problem();
            assert_eq!(
                (problem.status, problem.code.as_str()),
                (422, "validation_failed")
            );
            assert_eq!(problem.errors[0].field, field);
        }
    }
}
