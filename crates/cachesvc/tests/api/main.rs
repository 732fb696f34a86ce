//! The cache service as seed 000's clients use it, on both backends: the in-process store, and
//! Redis (with this test's own key prefix, beside other data in the same Redis).

mod cache;
mod helpers;
