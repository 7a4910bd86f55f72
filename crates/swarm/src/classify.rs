//! Query types and the keyword classifier (issue #5, item 3).
//!
//! The head sorts every query into one [`QueryType`], which picks the answering roles
//! ([`crate::routing::roles_for`]) and the timeout. With a spotter agent the head asks it
//! ([`crate::roles::spotter_prompt`]) and reads its answer with [`parse_label`]; without one,
//! or when the spotter's answer names no label, [`classify_keywords`] decides.
//!
//! # Keyword classifier priority
//!
//! Signals are checked in this order; the first layer that matches wins:
//!
//! 1. **strong code**: a code fence, a Python `def`/`class`/`import` line, a `>>>` doctest, C
//!    or Rust syntax, "write a … function/script/program/…", or phrases like "implement",
//!    "my code", "stack trace". HumanEval prompts (a signature with a docstring) land here.
//! 2. **strong math**: arithmetic between numbers (`12 * 7`, `3+4`, `2^10`, `2x + 3 = 7`),
//!    "calculate", "solve", "equation", "integral", "derivative", …, or two or more numbers
//!    with "how many"/"how much" (a word problem) or "times"/"plus"/"divided by".
//! 3. **creative**: "poem", "story", "haiku", "lyrics", "write a …", …
//! 4. **strong opinion**: "should I", "what do you think", "in your opinion", …
//! 5. **weak code**: a programming language name ("Rust" only capitalised), "function" or
//!    "code" (not "function of", "code of"), "bug", "algorithm", "compile", … — after
//!    creative and opinion so that "a poem about Python" or "what do you think of Rust" keep
//!    their type.
//! 6. **weak opinion**: "best", "better", "recommend", "favorite", …
//! 7. **complex reasoning**: "why", "explain", "compare", "step by step", "difference
//!    between", …, or a long query (more than [`LONG_QUERY_WORDS`] words).
//! 8. otherwise **simple fact**.

use std::fmt;

use serde::Serialize;

/// The kind of a query, which decides the answering roles and the timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum QueryType {
    /// A short factual question ("What is the capital of France?").
    SimpleFact,
    /// A question that needs explanation or multi-step reasoning.
    ComplexReasoning,
    /// Stories, poems and other creative writing.
    Creative,
    /// Writing, fixing or explaining code.
    Code,
    /// Arithmetic, algebra, word problems.
    Math,
    /// Advice, preferences, recommendations.
    Opinion,
}

impl QueryType {
    /// Every query type, in declaration order.
    pub const ALL: [QueryType; 6] = [
        QueryType::SimpleFact,
        QueryType::ComplexReasoning,
        QueryType::Creative,
        QueryType::Code,
        QueryType::Math,
        QueryType::Opinion,
    ];

    /// The label as the spotter answers it and as JSON shows it (`"SIMPLE_FACT"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            QueryType::SimpleFact => "SIMPLE_FACT",
            QueryType::ComplexReasoning => "COMPLEX_REASONING",
            QueryType::Creative => "CREATIVE",
            QueryType::Code => "CODE",
            QueryType::Math => "MATH",
            QueryType::Opinion => "OPINION",
        }
    }
}

impl fmt::Display for QueryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A query with more words than this counts as complex reasoning when nothing else matched.
pub const LONG_QUERY_WORDS: usize = 30;

/// Phrases (on the normalised text: lowercase words separated by single spaces) that make a
/// query code no matter what else it says.
const STRONG_CODE_PHRASES: &[&str] = &[
    "write a function",
    "write a python function",
    "write a program",
    "write a script",
    "write a class",
    "write code",
    "write a method",
    "implement",
    "implementation of",
    "compiler",
    "stack trace",
    "traceback",
    "segfault",
    "segmentation fault",
    "syntax error",
    "unit test",
    "unit tests",
    "refactor",
    "debug",
    "regex",
    "regular expression",
    "sql query",
    "source code",
    "this code",
    "my code",
    "code snippet",
    "time complexity",
    "linked list",
    "binary tree",
    "hash map",
    "hashmap",
    "leetcode",
    "null pointer",
    "nullpointerexception",
    "def",
    "return type",
];

/// What "write a …" asks for when it asks for code.
const CODE_ARTEFACTS: &[&str] = &[
    "function",
    "script",
    "program",
    "class",
    "method",
    "snippet",
    "query",
    "regex",
    "module",
    "code",
    "test",
    "tests",
    "cli",
    "parser",
    "algorithm",
    "implementation",
];

/// Raw substrings (on the lowercase text, punctuation kept) that only code contains.
const STRONG_CODE_SYNTAX: &[&str] = &[
    "```",
    ">>>",
    "#include",
    "fn main",
    "();",
    "=>",
    "!==",
    "===",
    "::",
    "console.log",
    "println!",
    "printf(",
    "print(",
    "std::",
    "self.",
    "__init__",
    "</",
    "/>",
    "lambda ",
];

/// Words that make a query math when no code signal matched.
const STRONG_MATH_PHRASES: &[&str] = &[
    "calculate",
    "compute",
    "solve",
    "equation",
    "equations",
    "integral",
    "integrate",
    "derivative",
    "differentiate",
    "sqrt",
    "square root",
    "cube root",
    "factorial",
    "logarithm",
    "probability",
    "percent of",
    "percentage of",
    "sum of",
    "product of",
    "remainder",
    "divisible",
    "prime factor",
    "prime factors",
    "least common multiple",
    "greatest common divisor",
    "arithmetic",
    "algebra",
    "polynomial",
    "squared",
    "cubed",
];

/// Operator words that make a query math only next to at least two numbers ("5 times 7",
/// but not "how many times has Brazil won").
const NUMBER_OPERATOR_WORDS: &[&str] = &[
    "times",
    "plus",
    "minus",
    "multiply",
    "multiplied by",
    "divided by",
    "divide",
];

/// Creative-writing phrases.
const CREATIVE_PHRASES: &[&str] = &[
    "poem",
    "poems",
    "poetry",
    "story",
    "stories",
    "short story",
    "haiku",
    "limerick",
    "sonnet",
    "lyrics",
    "song",
    "rap",
    "fairy tale",
    "fable",
    "fiction",
    "novel",
    "screenplay",
    "script for a",
    "dialogue",
    "slogan",
    "tagline",
    "joke",
    "riddle",
    "imagine",
    "compose",
    "write a",
    "write an",
    "write me a",
    "once upon a time",
    "creative",
];

/// Phrases that mark a request for an opinion even when a code word is present.
const STRONG_OPINION_PHRASES: &[&str] = &[
    "should i",
    "should we",
    "what do you think",
    "do you think",
    "in your opinion",
    "your opinion",
    "your view",
    "would you rather",
    "do you prefer",
    "would you recommend",
    "do you recommend",
    "is it worth",
    "your favorite",
    "your favourite",
    "do you like",
];

/// Words that make a query code when nothing stronger matched.
const WEAK_CODE_WORDS: &[&str] = &[
    "python",
    "javascript",
    "typescript",
    "java",
    "golang",
    "kotlin",
    "haskell",
    "ruby",
    "php",
    "perl",
    "scala",
    "bash",
    "shell script",
    "powershell",
    "html",
    "css",
    "sql",
    "json",
    "yaml",
    "c++",
    "c#",
    "cpp",
    "bug",
    "bugs",
    "coding",
    "programming",
    "compile",
    "compiles",
    "compiling",
    "algorithm",
    "api",
    "array",
    "recursion",
    "recursive",
    "git",
    "docker",
    "struct",
    "pointer",
];

/// Opinion words weaker than the phrases above.
const WEAK_OPINION_WORDS: &[&str] = &[
    "best",
    "better",
    "worse",
    "worst",
    "recommend",
    "prefer",
    "favorite",
    "favourite",
    "overrated",
    "underrated",
    "worth",
    "should",
    "advice",
];

/// Phrases that ask for explanation or multi-step reasoning.
const COMPLEX_PHRASES: &[&str] = &[
    "why",
    "explain",
    "explanation",
    "compare",
    "comparison",
    "contrast",
    "step by step",
    "difference between",
    "differences between",
    "how does",
    "how do",
    "how would",
    "how can",
    "analyze",
    "analyse",
    "analysis",
    "reason",
    "reasons",
    "implications",
    "consequences",
    "what would happen",
    "what happens if",
    "evaluate",
    "trade off",
    "tradeoffs",
    "trade offs",
    "pros and cons",
    "cause",
    "causes",
    "impact",
    "relationship between",
    "prove",
    "justify",
    "describe how",
];

/// The query split for matching: the lowercase text, and its words joined by single spaces
/// with a space at each end so that `" phrase "` matches whole words only.
struct Normalised {
    lower: String,
    padded_words: String,
    word_count: usize,
}

impl Normalised {
    fn new(query: &str) -> Self {
        let lower = query.to_lowercase();
        // `+` and `#` stay in words so that "c++" and "c#" survive.
        let words: Vec<&str> = lower
            .split(|c: char| !(c.is_alphanumeric() || c == '+' || c == '#'))
            .filter(|w| !w.is_empty())
            .collect();
        let mut padded_words = String::with_capacity(lower.len() + 2);
        padded_words.push(' ');
        for word in &words {
            padded_words.push_str(word);
            padded_words.push(' ');
        }
        Normalised {
            word_count: words.len(),
            lower,
            padded_words,
        }
    }

    /// Whether any of `phrases` occurs as whole words.
    fn has_phrase(&self, phrases: &[&str]) -> bool {
        phrases.iter().any(|phrase| {
            let mut needle = String::with_capacity(phrase.len() + 2);
            needle.push(' ');
            needle.push_str(phrase);
            needle.push(' ');
            self.padded_words.contains(&needle)
        })
    }

    /// Whether the query asks to write a program artefact: "write a/an/me a", then at most
    /// two more words, then "function", "script", "program", … ("write a bash script").
    fn asks_to_write_code(&self) -> bool {
        let words: Vec<&str> = self
            .padded_words
            .split(' ')
            .filter(|w| !w.is_empty())
            .collect();
        words.iter().enumerate().any(|(at, word)| {
            *word == "write"
                && words[at + 1..]
                    .iter()
                    .skip_while(|w| matches!(**w, "me" | "a" | "an" | "the"))
                    .take(3)
                    .any(|w| CODE_ARTEFACTS.contains(w))
        })
    }

    /// Whether any of `fragments` occurs anywhere in the lowercase text.
    fn has_substring(&self, fragments: &[&str]) -> bool {
        fragments.iter().any(|f| self.lower.contains(f))
    }
}

/// Whether some line looks like a Python definition or import (`def f(`, `class A:`,
/// `import x`, `from x import y`), as HumanEval prompts start.
fn has_python_definition_line(lower: &str) -> bool {
    lower.lines().map(str::trim_start).any(|line| {
        (line.starts_with("def ") && line.contains('('))
            || (line.starts_with("class ") && line.trim_end().ends_with(':'))
            || line.starts_with("import ")
            || (line.starts_with("from ") && line.contains(" import "))
    })
}

/// Whether the text has arithmetic between numbers: `12 * 7`, `3+4`, `2^10`, `x^2`,
/// `2x + 3 = 7`, `15 / 3`. A hyphen counts only with spaces around it or between short
/// numbers, so that year ranges ("1990-1995") and dates do not.
fn has_arithmetic(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    for (at, &op) in chars.iter().enumerate() {
        if !matches!(op, '+' | '-' | '*' | '/' | '^' | '×' | '÷' | '=' | '%') {
            continue;
        }
        // The operand before: skip spaces, then a digit (or a variable for ^ and =, as in
        // "x^2" and "2x = 6").
        let mut before = at;
        while before > 0 && chars[before - 1] == ' ' {
            before -= 1;
        }
        let mut after = at + 1;
        while after < chars.len() && chars[after] == ' ' {
            after += 1;
        }
        let Some(&left) = before.checked_sub(1).and_then(|i| chars.get(i)) else {
            continue;
        };
        let Some(&right) = chars.get(after) else {
            continue;
        };
        if op == '%' {
            // "15% of 80"
            let rest: String = chars[at + 1..].iter().collect();
            if left.is_ascii_digit() && rest.trim_start().starts_with("of ") {
                return true;
            }
            continue;
        }
        let left_ok = left.is_ascii_digit()
            || (matches!(op, '^' | '=' | '+' | '*') && left.is_ascii_alphabetic() && {
                // A one-letter variable: the letter must not be the end of a longer word.
                before < 2
                    || !chars[before - 2].is_alphanumeric()
                    || chars[before - 2].is_ascii_digit()
            });
        let right_ok = right.is_ascii_digit() || (op == '=' && right == '-');
        if !(left_ok && right_ok) {
            continue;
        }
        if op == '-' {
            let spaced = before < at && after > at + 1;
            let left_digits = chars[..before]
                .iter()
                .rev()
                .take_while(|c| c.is_ascii_digit())
                .count();
            let right_digits = chars[after..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            if !spaced && (left_digits >= 4 || right_digits >= 4) {
                continue;
            }
        }
        return true;
    }
    false
}

/// How many separate numbers the text contains.
fn count_numbers(text: &str) -> usize {
    let mut count = 0;
    let mut in_number = false;
    for c in text.chars() {
        let digit = c.is_ascii_digit();
        if digit && !in_number {
            count += 1;
        }
        in_number = digit || (in_number && (c == '.' || c == ','));
    }
    count
}

/// Classifies a query by keywords and patterns; see the module docs for the priority order.
pub fn classify_keywords(query: &str) -> QueryType {
    let text = Normalised::new(query);

    if text.has_substring(STRONG_CODE_SYNTAX)
        || has_python_definition_line(&text.lower)
        || text.has_phrase(STRONG_CODE_PHRASES)
        || text.asks_to_write_code()
    {
        return QueryType::Code;
    }
    let numbers = count_numbers(&text.lower);
    let word_problem =
        numbers >= 2 && text.has_phrase(&["how many", "how much", "how long", "how far"]);
    let spelled_operation = numbers >= 2 && text.has_phrase(NUMBER_OPERATOR_WORDS);
    if has_arithmetic(&text.lower)
        || word_problem
        || spelled_operation
        || text.has_phrase(STRONG_MATH_PHRASES)
    {
        return QueryType::Math;
    }
    if text.has_phrase(CREATIVE_PHRASES) {
        return QueryType::Creative;
    }
    if text.has_phrase(STRONG_OPINION_PHRASES) {
        return QueryType::Opinion;
    }
    // "function" and "code" alone are code, "the function of the liver" and "the code of
    // Hammurabi" are not; "Rust" only capitalised, so that "why does iron rust" is not.
    let function_word = text.has_phrase(&["function", "functions", "code"])
        && !text.has_phrase(&["function of", "functions of", "code of"]);
    let rust_language = query
        .split(|c: char| !c.is_alphanumeric())
        .any(|word| word == "Rust");
    if text.has_phrase(WEAK_CODE_WORDS) || function_word || rust_language {
        return QueryType::Code;
    }
    if text.has_phrase(WEAK_OPINION_WORDS) {
        return QueryType::Opinion;
    }
    if text.has_phrase(COMPLEX_PHRASES) || text.word_count > LONG_QUERY_WORDS {
        return QueryType::ComplexReasoning;
    }
    QueryType::SimpleFact
}

/// Reads the spotter's answer: the first label it mentions, tolerant of case, punctuation,
/// spaces or hyphens instead of underscores (`"complex reasoning"`, `"Simple-Fact"`,
/// `"SimpleFact"`) and extra words (`"The label is: CODE."`). When no full label occurs,
/// a few telling words count (`"factual"`, `"programming"`, `"arithmetic"`, …). `None` when
/// nothing matches.
pub fn parse_label(answer: &str) -> Option<QueryType> {
    // Upper case, every run of non-alphanumerics one space, padded so " LABEL " finds words.
    let mut padded = String::with_capacity(answer.len() + 2);
    padded.push(' ');
    let mut last_space = true;
    for c in answer.chars() {
        if c.is_alphanumeric() {
            padded.extend(c.to_uppercase());
            last_space = false;
        } else if !last_space {
            padded.push(' ');
            last_space = true;
        }
    }
    if !last_space {
        padded.push(' ');
    }

    const LABELS: &[(&str, QueryType)] = &[
        (" SIMPLE FACT ", QueryType::SimpleFact),
        (" SIMPLEFACT ", QueryType::SimpleFact),
        (" COMPLEX REASONING ", QueryType::ComplexReasoning),
        (" COMPLEXREASONING ", QueryType::ComplexReasoning),
        (" CREATIVE ", QueryType::Creative),
        (" CODE ", QueryType::Code),
        (" MATH ", QueryType::Math),
        (" OPINION ", QueryType::Opinion),
    ];
    const HINTS: &[(&str, QueryType)] = &[
        (" FACT ", QueryType::SimpleFact),
        (" FACTUAL ", QueryType::SimpleFact),
        (" REASONING ", QueryType::ComplexReasoning),
        (" COMPLEX ", QueryType::ComplexReasoning),
        (" CREATIVITY ", QueryType::Creative),
        (" CODING ", QueryType::Code),
        (" PROGRAMMING ", QueryType::Code),
        (" MATHS ", QueryType::Math),
        (" MATHEMATICS ", QueryType::Math),
        (" MATHEMATICAL ", QueryType::Math),
        (" ARITHMETIC ", QueryType::Math),
        (" OPINIONS ", QueryType::Opinion),
    ];
    let earliest = |table: &[(&str, QueryType)]| {
        table
            .iter()
            .filter_map(|(needle, q)| padded.find(needle).map(|at| (at, *q)))
            .min_by_key(|(at, _)| *at)
            .map(|(_, q)| q)
    };
    earliest(LABELS).or_else(|| earliest(HINTS))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn assert_all(expected: QueryType, queries: &[&str]) {
        for query in queries {
            assert_eq!(classify_keywords(query), expected, "{query:?}");
        }
    }

    #[test]
    fn labels_and_serde() {
        for q in QueryType::ALL {
            assert_eq!(
                serde_json::to_string(&q).unwrap(),
                format!("\"{}\"", q.as_str())
            );
            assert_eq!(parse_label(q.as_str()), Some(q));
            assert_eq!(q.to_string(), q.as_str());
        }
    }

    #[test]
    fn humaneval_prompts_are_code() {
        let prompts = [
            "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n    \"\"\" Check if in given list of numbers, are any two numbers closer to each other than\n    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n    True\n    \"\"\"\n",
            "\ndef truncate_number(number: float) -> float:\n    \"\"\" Given a positive floating point number, it can be decomposed into\n    and integer part (largest integer smaller than given number) and decimals\n    (leftover part always smaller than 1).\n\n    Return the decimal part of the number.\n    >>> truncate_number(3.5)\n    0.5\n    \"\"\"\n",
            "def fib(n: int):\n    \"\"\"Return n-th Fibonacci number.\n    >>> fib(10)\n    55\n    \"\"\"\n",
            "\ndef below_zero(operations: List[int]) -> bool:\n    \"\"\" You're given a list of deposit and withdrawal operations on a bank account.\n    \"\"\"\n",
            "def is_palindrome(text: str):\n    \"\"\"\n    Checks if given string is a palindrome\n    \"\"\"\n",
        ];
        assert_all(QueryType::Code, &prompts);
    }

    #[test]
    fn code_queries() {
        assert_all(
            QueryType::Code,
            &[
                "Write a Python function that reverses a linked list",
                "How do I implement quicksort in Rust?",
                "Why does my code fail to compile? error[E0382]: borrow of moved value",
                "```js\nconsole.log(1)\n```\nwhat does this print?",
                "Fix the bug in this JavaScript: let x = [1,2,3]; x.map(y => y*2)",
                "write a bash script that renames all .txt files",
                "What is the time complexity of binary search?",
                "Write a SQL query to find the second highest salary",
                "How do I reverse a string in python?",
                "Explain what a pointer is in C++",
                "What does the python function zip do?",
                "Convert this JSON to YAML",
                "Write me a quick Python script to download a file",
                "write code that prints hello",
            ],
        );
    }

    #[test]
    fn math_queries() {
        assert_all(
            QueryType::Math,
            &[
                "What is 17 * 23?",
                "what is 3+4",
                "Calculate the area of a circle with radius 5",
                "Solve 2x + 3 = 7",
                "What is the integral of x^2 from 0 to 1?",
                "Find the derivative of sin(x) cos(x)",
                "What is 15% of 80?",
                "Janet has 3 apples and buys 5 more. How many apples does she have?",
                "What is the square root of 144?",
                "Is 97 divisible by 7?",
                "What is 12 times 12?",
                "What is 2^10",
                "What is the probability of rolling two sixes with two dice?",
            ],
        );
    }

    #[test]
    fn creative_queries() {
        assert_all(
            QueryType::Creative,
            &[
                "Write a poem about the sea",
                "Tell me a story about a dragon who is afraid of fire",
                "Write a haiku about autumn",
                "Compose a limerick about a cat",
                "Write song lyrics about leaving home",
                "Imagine a world without electricity and describe a day in it",
                "Write a short story set on Mars",
                "Give me a slogan for a coffee shop",
                "Tell me a joke about penguins",
                "Write a poem about Python the snake",
                "Write an opening line for a mystery novel",
                "Write me a fairy tale for a five year old",
                "Write a story about a programmer who writes a function that grants wishes",
            ],
        );
    }

    #[test]
    fn opinion_queries() {
        assert_all(
            QueryType::Opinion,
            &[
                "Should I learn Rust or Go first?",
                "What do you think about remote work?",
                "What is the best pizza topping?",
                "In your opinion, is social media good for teenagers?",
                "Is it worth buying an electric car?",
                "Which is better, Vim or Emacs?",
                "What's your favorite book?",
                "Would you recommend living in Berlin?",
                "Do you think AI will replace programmers?",
                "What are the best places to visit in Japan?",
                "Should we have a four day work week?",
                "Any advice for a first marathon?",
            ],
        );
    }

    #[test]
    fn complex_reasoning_queries() {
        assert_all(
            QueryType::ComplexReasoning,
            &[
                "Why is the sky blue?",
                "Explain how vaccines train the immune system",
                "Compare the causes of World War I and World War II",
                "What is the difference between weather and climate?",
                "How does a refrigerator keep food cold?",
                "Think step by step: if all bloops are razzies and all razzies are lazzies, are all bloops lazzies?",
                "What would happen if the moon disappeared?",
                "Analyze the economic impact of the printing press",
                "What are the pros and cons of nuclear power?",
                "How do tides work?",
                "Describe how the Roman republic turned into an empire, covering the role of the army, the senate, the civil wars, the reforms of the Gracchi brothers and the ambitions of men like Marius, Sulla, Pompey and Caesar",
                "Why did the Roman Empire fall?",
                "Why does iron rust?",
            ],
        );
    }

    #[test]
    fn simple_fact_queries() {
        assert_all(
            QueryType::SimpleFact,
            &[
                "What is the capital of France?",
                "Who wrote Hamlet?",
                "When did World War II end?",
                "How many legs does a spider have?",
                "What is the boiling point of water in Celsius?",
                "Who won the 2018 World Cup?",
                "What year did the Berlin Wall fall?",
                "Who was president of the US in 1990-1995?",
                "What is the function of the liver?",
                "What is the chemical symbol for gold?",
                "Where is Mount Kilimanjaro?",
                "What language is spoken in Brazil?",
                "How many times has Brazil won the World Cup?",
                "What is the code of Hammurabi?",
            ],
        );
    }

    #[test]
    fn parse_label_is_tolerant() {
        let cases = [
            ("CODE", QueryType::Code),
            ("code", QueryType::Code),
            ("  Math.\n", QueryType::Math),
            ("simple fact", QueryType::SimpleFact),
            ("Simple-Fact", QueryType::SimpleFact),
            ("SimpleFact", QueryType::SimpleFact),
            ("complex_reasoning", QueryType::ComplexReasoning),
            ("COMPLEX REASONING", QueryType::ComplexReasoning),
            ("The label is: CREATIVE", QueryType::Creative),
            ("**OPINION**", QueryType::Opinion),
            ("Label: MATH (it is arithmetic, not CODE)", QueryType::Math),
            ("This is a CODE question, not MATH", QueryType::Code),
            ("mathematics", QueryType::Math),
            ("It's a programming question", QueryType::Code),
        ];
        for (answer, expected) in cases {
            assert_eq!(parse_label(answer), Some(expected), "{answer:?}");
        }
    }

    #[test]
    fn parse_label_rejects_garbage() {
        for answer in ["", "   ", "I don't know", "barcode", "unicode", "aftermath"] {
            assert_eq!(parse_label(answer), None, "{answer:?}");
        }
    }

    #[test]
    fn arithmetic_pattern() {
        assert!(has_arithmetic("12 * 7"));
        assert!(has_arithmetic("x^2"));
        assert!(has_arithmetic("10 - 3"));
        assert!(has_arithmetic("5-3"));
        assert!(!has_arithmetic("1990-1995"));
        assert!(!has_arithmetic("covid-19"));
        assert!(!has_arithmetic("a well-known fact"));
    }
}
