//! The model-price registry: prices in nano-dollars per million tokens, each with the instant it
//! takes effect. An event is priced with the newest price whose `effective_from` is not after it.

use std::collections::HashMap;

use crate::event::{CostSource, Event};

/// Also what the control topic carries (`control::ControlSnapshot::prices`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelPrice {
    pub provider: String,
    pub model: String,
    pub effective_from_ms: i64,
    pub input_nanos_per_mtok: i64,
    pub output_nanos_per_mtok: i64,
}

/// Cost in nano-dollars, rounded half up to the nearest nano-dollar; exact integer arithmetic.
pub fn cost_nanos(price: &ModelPrice, prompt_tokens: u32, completion_tokens: u32) -> i64 {
    let micro = i128::from(prompt_tokens) * i128::from(price.input_nanos_per_mtok)
        + i128::from(completion_tokens) * i128::from(price.output_nanos_per_mtok);
    ((micro + 500_000) / 1_000_000) as i64
}

/// Prices indexed by provider then model (both lowercase), each list sorted by `effective_from_ms`.
/// Lookups borrow the event's names: no allocation on the hot path unless a name has capitals.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    by_provider: HashMap<String, HashMap<String, Vec<ModelPrice>>>,
}

fn lowercase(text: &str) -> std::borrow::Cow<'_, str> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(text.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

impl PriceBook {
    pub fn new(prices: impl IntoIterator<Item = ModelPrice>) -> Self {
        let mut by_provider: HashMap<String, HashMap<String, Vec<ModelPrice>>> = HashMap::new();
        for price in prices {
            by_provider
                .entry(price.provider.to_ascii_lowercase())
                .or_default()
                .entry(price.model.to_ascii_lowercase())
                .or_default()
                .push(price);
        }
        for list in by_provider.values_mut().flat_map(HashMap::values_mut) {
            list.sort_by_key(|p| p.effective_from_ms);
            list.dedup_by_key(|p| p.effective_from_ms);
        }
        PriceBook { by_provider }
    }

    /// The price in effect for `provider`/`model` at `at_ms`. A dated model name such as
    /// `gpt-4o-2024-08-06` falls back to the longest registered name it extends (`gpt-4o`).
    pub fn lookup(&self, provider: &str, model: &str, at_ms: i64) -> Option<&ModelPrice> {
        let models = self.by_provider.get(lowercase(provider).as_ref())?;
        let model = lowercase(model);
        let mut name: &str = &model;
        loop {
            if let Some(list) = models.get(name) {
                let position = list.partition_point(|p| p.effective_from_ms <= at_ms);
                return position.checked_sub(1).map(|i| &list[i]);
            }
            name = &name[..name.rfind('-')?];
        }
    }

    /// Prices an event that arrived without a client cost; events with one keep it.
    pub fn price<S: AsRef<str>>(&self, event: &mut Event<S>) {
        if event.cost_source == CostSource::Client {
            return;
        }
        match self.lookup(event.provider.as_ref(), event.model.as_ref(), event.timestamp_ms) {
            Some(price) => {
                event.cost_nanos = cost_nanos(price, event.prompt_tokens, event.completion_tokens);
                event.cost_source = CostSource::Computed;
            }
            None => {
                event.cost_nanos = 0;
                event.cost_source = CostSource::Unknown;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(model: &str, from: i64, input: i64, output: i64) -> ModelPrice {
        ModelPrice {
            provider: "openai".into(),
            model: model.into(),
            effective_from_ms: from,
            input_nanos_per_mtok: input,
            output_nanos_per_mtok: output,
        }
    }

    #[test]
    fn seed_example_costs_exactly() {
        // gpt-4o at 0.0025 / 0.01 USD per 1K tokens: 1000 prompt + 500 completion = 0.0075 USD.
        let p = price("gpt-4o", 0, 2_500_000_000, 10_000_000_000);
        assert_eq!(cost_nanos(&p, 1000, 500), 7_500_000);
        // gpt-4o-mini, 0.15 USD per M prompt tokens: 7 tokens = 1.05 micro-dollars = 1050 nanos.
        let mini = price("gpt-4o-mini", 0, 150_000_000, 600_000_000);
        assert_eq!(cost_nanos(&mini, 7, 0), 1050);
        // Half a nano-dollar rounds up.
        let tiny = price("x", 0, 500_000, 0);
        assert_eq!(cost_nanos(&tiny, 1, 0), 1);
    }

    #[test]
    fn lookup_respects_effective_dates_and_dated_names() {
        let book =
            PriceBook::new([price("gpt-4o", 100, 1, 1), price("gpt-4o", 200, 2, 2), price("gpt-4", 0, 9, 9)]);
        assert!(book.lookup("openai", "gpt-4o", 99).is_none());
        assert_eq!(book.lookup("openai", "gpt-4o", 150).map(|p| p.input_nanos_per_mtok), Some(1));
        assert_eq!(book.lookup("OpenAI", "GPT-4o", 200).map(|p| p.input_nanos_per_mtok), Some(2));
        assert_eq!(book.lookup("openai", "gpt-4o-2024-08-06", 300).map(|p| p.input_nanos_per_mtok), Some(2));
        assert!(book.lookup("anthropic", "gpt-4o", 300).is_none());
        assert!(book.lookup("openai", "davinci", 300).is_none());
    }
}
