//! Choosing among candidates by behaviour: groups of candidates that did the same on every
//! check, scored by the prompt's examples first and CodeT's dual agreement second.

use std::collections::HashMap;

use super::program::Behaviour;

/// One group of candidates that behaved alike, with its score.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// The candidates (indices into what [`choose`] was given), in order.
    pub members: Vec<usize>,
    /// How many of the prompt's examples the group passes.
    pub examples_passed: usize,
    /// How many of the written tests it passes.
    pub tests_passed: usize,
    /// The group's agents' summed weight (ties).
    pub weight: f32,
}

impl Scored {
    /// Dual agreement: candidates that behave so × tests that behaviour passes.
    pub fn agreement(&self) -> usize {
        self.members.len() * self.tests_passed
    }

    /// Dual agreement with the candidates counted as their square root, squared to stay in
    /// integers: candidates × tests². Candidates of one model share its mistakes, so each
    /// more that agrees is weaker evidence than a test more passed. Replayed on the recorded
    /// pools of all 164 HumanEval problems (docs/EVAL.md, "Every candidate recorded"), this
    /// chose a right answer in 3 more problems than candidates × tests and lost none
    /// (HumanEval/68: one fresh sample passing all four written tests, right, against two
    /// first candidates passing two, wrong: 16 against 8, where plain agreement ties 4 to 4).
    pub fn score(&self) -> usize {
        self.members.len() * self.tests_passed * self.tests_passed
    }

    /// The order of groups: examples passed, then [`Scored::score`], then tests passed,
    /// then size, then weight.
    fn better_than(&self, other: &Scored) -> bool {
        let key = |s: &Scored| {
            (
                s.examples_passed,
                s.score(),
                s.tests_passed,
                s.members.len(),
            )
        };
        match key(self).cmp(&key(other)) {
            std::cmp::Ordering::Equal => self.weight > other.weight,
            order => order.is_gt(),
        }
    }
}

/// What [`choose`] chose.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// The answer given: the group's member with the highest weight (the first on ties).
    pub winner: usize,
    /// The chosen group.
    pub group: Scored,
    /// How many groups of behaviour there were.
    pub groups: usize,
    /// How many candidates ran (had code that defines).
    pub ran: usize,
}

/// The best group among `candidates` (each one's behaviour, `None` when it could not run,
/// and its agent's weight), where the first `examples` checks are the prompt's examples and
/// the rest are written tests. `None` when no candidate ran.
pub fn choose(candidates: &[(Option<&Behaviour>, f32)], examples: usize) -> Option<Choice> {
    let mut groups: Vec<Scored> = Vec::new();
    let mut by_signature: HashMap<Vec<&str>, usize> = HashMap::new();
    let mut ran = 0;
    for (index, (behaviour, weight)) in candidates.iter().enumerate() {
        let Some(behaviour) = behaviour else { continue };
        let Some(signature) = behaviour.signature() else {
            continue;
        };
        ran += 1;
        match by_signature.get(&signature) {
            Some(&group) => {
                groups[group].members.push(index);
                groups[group].weight += weight;
            }
            None => {
                let passed = |checks: &[super::CheckResult]| checks.iter().filter(|c| c.ok).count();
                let split = examples.min(behaviour.checks.len());
                by_signature.insert(signature, groups.len());
                groups.push(Scored {
                    members: vec![index],
                    examples_passed: passed(&behaviour.checks[..split]),
                    tests_passed: passed(&behaviour.checks[split..]),
                    weight: *weight,
                });
            }
        }
    }
    let count = groups.len();
    let mut best: Option<Scored> = None;
    for group in groups {
        if best.as_ref().is_none_or(|b| group.better_than(b)) {
            best = Some(group);
        }
    }
    let group = best?;
    let mut winner = group.members[0];
    for &m in &group.members {
        if candidates[m].1 > candidates[winner].1 {
            winner = m;
        }
    }
    Some(Choice {
        winner,
        group,
        groups: count,
        ran,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::CheckResult;
    use super::*;

    /// A behaviour from (ok, out) per check.
    fn did(checks: &[(bool, &str)]) -> Behaviour {
        Behaviour {
            defined: true,
            error: String::new(),
            checks: checks
                .iter()
                .map(|&(ok, out)| CheckResult {
                    ok,
                    out: out.to_owned(),
                    err: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn examples_come_first_then_dual_agreement() {
        // One example, three tests. a and c behave alike; b passes more tests but fails the
        // example; d passes the example and one test alone.
        let a = did(&[(true, "1"), (true, "2"), (true, "3"), (false, "0")]);
        let b = did(&[(false, "9"), (true, "2"), (true, "3"), (true, "4")]);
        let d = did(&[(true, "1"), (true, "2"), (false, "5"), (false, "0")]);
        let broken = Behaviour {
            defined: false,
            ..Behaviour::default()
        };
        let candidates = [
            (Some(&a), 1.0),
            (Some(&b), 5.0),
            (Some(&a), 2.0),
            (Some(&d), 9.0),
            (None, 9.0),
            (Some(&broken), 9.0),
        ];
        let choice = choose(&candidates, 1).unwrap();
        assert_eq!(choice.group.members, [0, 2]);
        assert_eq!(choice.winner, 2, "the heavier member answers");
        assert_eq!(choice.group.examples_passed, 1);
        assert_eq!(choice.group.tests_passed, 2);
        assert_eq!(choice.group.agreement(), 4);
        assert_eq!(choice.groups, 3);
        assert_eq!(choice.ran, 4);
        // Counted as a test, the example no longer comes first: the pair passing three
        // (2 × 3² = 18) beats b passing three alone (1 × 3² = 9) — agreement among
        // candidates counts.
        let choice = choose(&candidates, 0).unwrap();
        assert_eq!(choice.group.members, [0, 2]);
        // A lone candidate passing every test beats a pair passing none.
        let none = did(&[(false, "x"), (false, "y")]);
        let all = did(&[(true, "1"), (true, "2")]);
        let choice = choose(
            &[(Some(&none), 1.0), (Some(&none), 1.0), (Some(&all), 1.0)],
            0,
        )
        .unwrap();
        assert_eq!(choice.group.members, [2]);
    }

    #[test]
    fn tests_weigh_more_than_agreeing_candidates() {
        // A pair passing two of four tests and a lone candidate passing all four: 2 × 2²
        // against 1 × 4². The lone one wins, though the pair comes first and is larger.
        let pair = did(&[(true, "1"), (true, "2"), (false, "0"), (false, "0")]);
        let lone = did(&[(true, "1"), (true, "2"), (true, "3"), (true, "4")]);
        let choice = choose(
            &[(Some(&pair), 1.0), (Some(&pair), 1.0), (Some(&lone), 1.0)],
            0,
        )
        .unwrap();
        assert_eq!(choice.group.members, [2]);
        assert_eq!((choice.group.agreement(), choice.group.score()), (4, 16));
        // Agreement still counts: five passing two (5 × 2² = 20) beat one passing four (16).
        let mut five = vec![(Some(&pair), 1.0); 5];
        five.push((Some(&lone), 1.0));
        let choice = choose(&five, 0).unwrap();
        assert_eq!(choice.group.members, [0, 1, 2, 3, 4]);
        // Equal scores go to more tests passed: four passing one (4) and one passing two (4).
        let one = did(&[(true, "1"), (false, "0")]);
        let two = did(&[(true, "1"), (true, "2")]);
        let mut four = vec![(Some(&one), 1.0); 4];
        four.push((Some(&two), 1.0));
        assert_eq!(choose(&four, 0).unwrap().group.members, [4]);
    }

    #[test]
    fn ties_go_to_size_then_weight() {
        let x = did(&[(false, "1")]);
        let y = did(&[(false, "2")]);
        let choice = choose(&[(Some(&x), 1.0), (Some(&y), 1.0), (Some(&y), 0.5)], 0).unwrap();
        assert_eq!(choice.group.members, [1, 2]);
        let choice = choose(&[(Some(&x), 1.0), (Some(&y), 3.0)], 0).unwrap();
        assert_eq!(choice.group.members, [1]);
        assert_eq!(choose(&[(None, 1.0)], 0), None);
        assert_eq!(choose(&[], 0), None);
    }
}
