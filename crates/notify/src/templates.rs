//! One template per event type: shipped with the crate (`templates/<type>.txt`, compiled in),
//! each replaceable by a file of the same name in `services.notify.templates_dir`.
//!
//! A template's first line is `Subject: ...`; the rest (after one blank line) is the body. Both
//! are Jinja (minijinja) over `event` (id, type, source, key, occurred_at), `data` (the event's
//! data) and `user` (id, name, email of the user it concerns, when there is one).
//!
//! Every template is compiled and rendered against a sample event of its type at start, with
//! undefined names refused: a syntax error, a misspelt variable or a missing subject line stops
//! the service at start with the file named, never a delivery at run time. At run time an absent
//! optional field renders empty.

use std::path::Path;

use anyhow::Context as _;
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Value, json};

use crate::settings::EVENT_TYPES;

/// The shipped templates.
const SHIPPED: [(&str, &str); 6] = [
    (
        "user.registered",
        include_str!("../templates/user.registered.txt"),
    ),
    (
        "order.created",
        include_str!("../templates/order.created.txt"),
    ),
    (
        "order.processed",
        include_str!("../templates/order.processed.txt"),
    ),
    (
        "order.failed",
        include_str!("../templates/order.failed.txt"),
    ),
    (
        "order.cancelled",
        include_str!("../templates/order.cancelled.txt"),
    ),
    ("stock.low", include_str!("../templates/stock.low.txt")),
];

/// A rendered notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub body: String,
}

/// The compiled templates.
pub struct Templates {
    env: Environment<'static>,
}

impl Templates {
    /// The shipped templates, with those of `dir` (when given) in their place. Errors name the
    /// file and say what is wrong.
    pub fn load(dir: Option<&Path>) -> anyhow::Result<Self> {
        let mut sources: Vec<(String, String, String)> = SHIPPED
            .iter()
            .map(|(name, source)| {
                (
                    (*name).to_owned(),
                    (*source).to_owned(),
                    format!("(shipped) {name}.txt"),
                )
            })
            .collect();
        if let Some(dir) = dir {
            let entries = std::fs::read_dir(dir)
                .with_context(|| format!("reading templates_dir {}", dir.display()))?;
            for entry in entries {
                let path = entry?.path();
                let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".txt"))
                else {
                    continue;
                };
                anyhow::ensure!(
                    EVENT_TYPES.contains(&name),
                    "template {}: no event type `{name}` (templates are named <type>.txt, types: {})",
                    path.display(),
                    EVENT_TYPES.join(", ")
                );
                let source = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading template {}", path.display()))?;
                if let Some(slot) = sources.iter_mut().find(|(n, _, _)| n == name) {
                    *slot = (name.to_owned(), source, path.display().to_string());
                }
            }
        }
        // Strict first: every template must render its sample with no undefined name.
        let mut strict = Environment::new();
        strict.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        for (name, source, origin) in sources {
            strict
                .add_template_owned(name.clone(), source.clone())
                .with_context(|| format!("template {origin}"))?;
            let sample = sample(&name);
            let rendered = render_with(&strict, &name, &sample)
                .with_context(|| format!("template {origin} does not render a sample {name}"))?;
            anyhow::ensure!(
                !rendered.subject.is_empty(),
                "template {origin}: the subject line renders empty"
            );
            env.add_template_owned(name, source)
                .with_context(|| format!("template {origin}"))?;
        }
        Ok(Self { env })
    }

    /// Renders the template of `event_type` over `context` (see [`context`]).
    pub fn render(&self, event_type: &str, context: &Value) -> anyhow::Result<Rendered> {
        render_with(&self.env, event_type, context)
    }
}

fn render_with(env: &Environment<'_>, name: &str, context: &Value) -> anyhow::Result<Rendered> {
    let template = env.get_template(name)?;
    let text = template.render(minijinja::value::Serde(context))?;
    let (first, rest) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    let subject = first
        .strip_prefix("Subject:")
        .map(str::trim)
        .context("the first line must be `Subject: ...`")?;
    // One line, whatever the data held (a header must not be split).
    let subject: String = subject
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let body = rest.strip_prefix('\n').unwrap_or(rest);
    Ok(Rendered {
        subject,
        body: body.trim_end().to_owned() + "\n",
    })
}

/// What a template sees.
pub fn context(event: &kit::event::Event, user: Option<&Value>) -> Value {
    json!({
        "event": {
            "id": event.id.to_string(),
            "type": event.topic,
            "source": event.source,
            "key": event.key,
            "occurred_at": event.occurred_at.to_rfc3339(),
        },
        "data": event.data,
        "user": user.cloned().unwrap_or_else(|| json!({"id": null, "name": null, "email": null})),
    })
}

/// A sample event of type `name`, shaped as its producer writes it.
fn sample(name: &str) -> Value {
    let order = |status: &str| {
        json!({
            "id": 7, "user_id": 3, "status": status, "total": 37.5, "total_price": 37.5,
            "items": [{"product_id": 1, "quantity": 3, "unit_price": 12.5, "line_total": 37.5}],
            "product_id": 1, "quantity": 3, "client_total_price": null, "warnings": [],
            "failure_reason": "payment declined", "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z", "processed_at": null,
            "previous_status": "pending",
        })
    };
    let data = match name {
        "user.registered" => json!({
            "id": 3, "username": "alice", "email": "alice@example.com", "name": "Alice",
            "role": "user", "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
        }),
        "stock.low" => json!({
            "product_id": 1, "sku": "LAMP-1", "name": "Lamp", "stock": 2, "threshold": 10,
        }),
        other => order(other.strip_prefix("order.").unwrap_or(other)),
    };
    json!({
        "event": {
            "id": "0190b5d2-0000-7000-8000-000000000000", "type": name, "source": "sample",
            "key": "sample:1", "occurred_at": "2026-01-01T00:00:00Z",
        },
        "data": data,
        "user": {"id": 3, "name": "Alice", "email": "alice@example.com"},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_templates_render_their_samples() {
        let templates = Templates::load(None).expect("shipped templates");
        let rendered = templates
            .render("order.created", &sample("order.created"))
            .expect("render");
        assert_eq!(rendered.subject, "Order #7 received");
        assert!(rendered.body.contains("Hello Alice,"), "{}", rendered.body);
        assert!(
            rendered.body.contains("3 x product 1 at 12.5"),
            "{}",
            rendered.body
        );
    }

    #[test]
    fn an_override_replaces_the_shipped_template() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join("stock.low.txt"),
            "Subject: LOW {{ data.sku }}\n\n{{ data.stock }} left\n",
        )
        .expect("write");
        let templates = Templates::load(Some(dir.path())).expect("override");
        let rendered = templates
            .render("stock.low", &sample("stock.low"))
            .expect("render");
        assert_eq!(
            rendered,
            Rendered {
                subject: "LOW LAMP-1".into(),
                body: "2 left\n".into()
            }
        );
    }

    #[test]
    fn template_mistakes_are_start_up_errors_naming_the_file() {
        let cases = [
            (
                "order.failed.txt",
                "Subject: {{ data.id \n",
                "order.failed.txt",
            ),
            (
                "order.failed.txt",
                "Subject: {{ data.totl }}\n\nx",
                "order.failed.txt",
            ),
            ("order.failed.txt", "no subject line\n", "Subject"),
            ("order.shipped.txt", "Subject: x\n", "order.shipped"),
        ];
        for (file, source, named) in cases {
            let dir = tempfile::tempdir().expect("dir");
            std::fs::write(dir.path().join(file), source).expect("write");
            let err = Templates::load(Some(dir.path()))
                .err()
                .unwrap_or_else(|| panic!("{file}: {source:?} was accepted"));
            assert!(format!("{err:#}").contains(named), "{source:?}: {err:#}");
        }
    }
}
