//! "Did you mean": the closest of a list of names, for typos in argument names and in `key`.

/// The candidate within two edits of `word` (the closest, first on a tie), if any.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| (distance(word, c), c))
        .filter(|(d, c)| *d <= 2 && *d < c.chars().count().max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `"; did you mean `x`?"` for the argument name closest to `name`, or nothing.
pub(crate) fn did_you_mean(name: &syn::Ident, names: &[&syn::Ident]) -> String {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    closest(&name.to_string(), names.iter().map(String::as_str))
        .map(|c| format!("; did you mean `{c}`?"))
        .unwrap_or_default()
}

/// Levenshtein distance (insertions, deletions, substitutions), with a transposition of two
/// neighbours counted as one edit.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::closest;

    #[test]
    fn suggests_within_two_edits() {
        let args = ["key", "ttl", "store", "skip", "scope", "namespace"];
        assert_eq!(closest("tll", args), Some("ttl"));
        assert_eq!(closest("stroe", args), Some("store"));
        assert_eq!(closest("namespac", args), Some("namespace"));
        assert_eq!(
            closest("order_idd", ["order_id", "amount"]),
            Some("order_id")
        );
        assert_eq!(closest("retries", args), None);
        assert_eq!(closest("key", args), None);
        assert_eq!(closest("x", ["id"]), None);
    }
}
