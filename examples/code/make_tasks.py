#!/usr/bin/env python3
"""Writes the example code task set: 36 small functions with tests, MBPP-style prompts for an
instruct model (rendered with its chat template), 24 for fitness and 12 held out, plus the
reference completions that `cycleqd-engine score` must score 1.0.

    python3 examples/code/make_tasks.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (entry point, signature, what it does, reference body, tests)
PROBLEMS = [
    ("add", "add(a, b)", "returns the sum of two numbers", "    return a + b",
     ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(0.5, 0.25) == 0.75"]),
    ("is_even", "is_even(n)", "returns True when the integer n is even", "    return n % 2 == 0",
     ["assert is_even(4)", "assert not is_even(7)", "assert is_even(0)", "assert not is_even(-3)"]),
    ("reverse_string", "reverse_string(s)", "returns the string s reversed", "    return s[::-1]",
     ["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''", "assert reverse_string('racecar') == 'racecar'"]),
    ("factorial", "factorial(n)", "returns n! for a non-negative integer n",
     "    out = 1\n    for i in range(2, n + 1):\n        out *= i\n    return out",
     ["assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(10) == 3628800"]),
    ("fibonacci", "fibonacci(n)", "returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1",
     "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
     ["assert fibonacci(0) == 0", "assert fibonacci(1) == 1", "assert fibonacci(10) == 55", "assert fibonacci(20) == 6765"]),
    ("is_palindrome", "is_palindrome(s)", "returns True when s reads the same backwards, ignoring case and non-letters",
     "    t = [c.lower() for c in s if c.isalpha()]\n    return t == t[::-1]",
     ["assert is_palindrome('A man, a plan, a canal: Panama')", "assert not is_palindrome('hello')", "assert is_palindrome('')"]),
    ("count_vowels", "count_vowels(s)", "returns how many vowels (a, e, i, o, u, either case) s holds",
     "    return sum(1 for c in s.lower() if c in 'aeiou')",
     ["assert count_vowels('hello') == 2", "assert count_vowels('AEIOU') == 5", "assert count_vowels('xyz') == 0"]),
    ("max_of_list", "max_of_list(xs)", "returns the largest element of a non-empty list",
     "    best = xs[0]\n    for x in xs[1:]:\n        if x > best:\n            best = x\n    return best",
     ["assert max_of_list([3, 1, 4, 1, 5]) == 5", "assert max_of_list([-2, -7]) == -2", "assert max_of_list([9]) == 9"]),
    ("sum_of_digits", "sum_of_digits(n)", "returns the sum of the decimal digits of the non-negative integer n",
     "    return sum(int(d) for d in str(n))",
     ["assert sum_of_digits(0) == 0", "assert sum_of_digits(1234) == 10", "assert sum_of_digits(99999) == 45"]),
    ("is_prime", "is_prime(n)", "returns True when the integer n is prime",
     "    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n            return False\n        i += 1\n    return True",
     ["assert is_prime(2)", "assert is_prime(97)", "assert not is_prime(1)", "assert not is_prime(91)"]),
    ("gcd", "gcd(a, b)", "returns the greatest common divisor of two positive integers",
     "    while b:\n        a, b = b, a % b\n    return a",
     ["assert gcd(12, 18) == 6", "assert gcd(7, 13) == 1", "assert gcd(100, 10) == 10"]),
    ("flatten", "flatten(xss)", "flattens a list of lists into one list, keeping the order",
     "    return [x for xs in xss for x in xs]",
     ["assert flatten([[1, 2], [3], []]) == [1, 2, 3]", "assert flatten([]) == []", "assert flatten([['a'], ['b', 'c']]) == ['a', 'b', 'c']"]),
    ("unique_sorted", "unique_sorted(xs)", "returns the distinct elements of xs in increasing order",
     "    return sorted(set(xs))",
     ["assert unique_sorted([3, 1, 3, 2, 1]) == [1, 2, 3]", "assert unique_sorted([]) == []", "assert unique_sorted([5]) == [5]"]),
    ("word_count", "word_count(s)", "returns a dict mapping each whitespace-separated word of s to how often it occurs",
     "    out = {}\n    for w in s.split():\n        out[w] = out.get(w, 0) + 1\n    return out",
     ["assert word_count('a b a') == {'a': 2, 'b': 1}", "assert word_count('') == {}", "assert word_count('x  x\\nx') == {'x': 3}"]),
    ("capitalize_words", "capitalize_words(s)", "returns s with the first letter of every space-separated word in upper case",
     "    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
     ["assert capitalize_words('hello world') == 'Hello World'", "assert capitalize_words('a') == 'A'", "assert capitalize_words('') == ''"]),
    ("second_largest", "second_largest(xs)", "returns the second largest distinct value of xs (it has at least two)",
     "    return sorted(set(xs))[-2]",
     ["assert second_largest([1, 2, 3]) == 2", "assert second_largest([5, 5, 4]) == 4", "assert second_largest([-1, -2]) == -2"]),
    ("celsius_to_fahrenheit", "celsius_to_fahrenheit(c)", "converts a temperature in degrees Celsius to Fahrenheit",
     "    return c * 9 / 5 + 32",
     ["assert celsius_to_fahrenheit(0) == 32", "assert celsius_to_fahrenheit(100) == 212", "assert celsius_to_fahrenheit(-40) == -40"]),
    ("chunk", "chunk(xs, n)", "splits xs into consecutive lists of n elements (the last may be shorter)",
     "    return [xs[i:i + n] for i in range(0, len(xs), n)]",
     ["assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]", "assert chunk([], 3) == []", "assert chunk([1, 2], 5) == [[1, 2]]"]),
    ("rotate_left", "rotate_left(xs, k)", "rotates the list xs left by k positions (k may exceed its length)",
     "    if not xs:\n        return []\n    k %= len(xs)\n    return xs[k:] + xs[:k]",
     ["assert rotate_left([1, 2, 3, 4], 1) == [2, 3, 4, 1]", "assert rotate_left([1, 2, 3], 5) == [3, 1, 2]", "assert rotate_left([], 2) == []"]),
    ("binary_string", "binary_string(n)", "returns the binary representation of the non-negative integer n without a prefix",
     "    return bin(n)[2:]",
     ["assert binary_string(0) == '0'", "assert binary_string(5) == '101'", "assert binary_string(255) == '11111111'"]),
    ("count_char", "count_char(s, c)", "returns how many times the character c occurs in s",
     "    return s.count(c)",
     ["assert count_char('banana', 'a') == 3", "assert count_char('', 'x') == 0", "assert count_char('aaa', 'b') == 0"]),
    ("merge_sorted", "merge_sorted(a, b)", "merges two sorted lists into one sorted list",
     "    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]",
     ["assert merge_sorted([1, 4], [2, 3, 5]) == [1, 2, 3, 4, 5]", "assert merge_sorted([], [1]) == [1]", "assert merge_sorted([2, 2], [2]) == [2, 2, 2]"]),
    ("is_anagram", "is_anagram(a, b)", "returns True when a and b are anagrams of each other (case-sensitive)",
     "    return sorted(a) == sorted(b)",
     ["assert is_anagram('listen', 'silent')", "assert not is_anagram('abc', 'abd')", "assert is_anagram('', '')"]),
    ("running_sum", "running_sum(xs)", "returns the list of prefix sums of xs",
     "    out, total = [], 0\n    for x in xs:\n        total += x\n        out.append(total)\n    return out",
     ["assert running_sum([1, 2, 3]) == [1, 3, 6]", "assert running_sum([]) == []", "assert running_sum([5, -5]) == [5, 0]"]),
    # held out
    ("square_all", "square_all(xs)", "returns the squares of the numbers in xs, in order",
     "    return [x * x for x in xs]",
     ["assert square_all([1, 2, 3]) == [1, 4, 9]", "assert square_all([]) == []", "assert square_all([-2]) == [4]"]),
    ("min_max", "min_max(xs)", "returns the tuple (smallest, largest) of a non-empty list",
     "    return (min(xs), max(xs))",
     ["assert min_max([3, 1, 2]) == (1, 3)", "assert min_max([7]) == (7, 7)", "assert min_max([-1, -5, 0]) == (-5, 0)"]),
    ("remove_duplicates", "remove_duplicates(xs)", "returns xs without repeated elements, keeping first occurrences in order",
     "    seen, out = set(), []\n    for x in xs:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out",
     ["assert remove_duplicates([3, 1, 3, 2, 1]) == [3, 1, 2]", "assert remove_duplicates([]) == []", "assert remove_duplicates(['a', 'a']) == ['a']"]),
    ("power", "power(base, exp)", "returns base raised to the non-negative integer exp, without using ** or pow",
     "    out = 1\n    for _ in range(exp):\n        out *= base\n    return out",
     ["assert power(2, 10) == 1024", "assert power(5, 0) == 1", "assert power(-3, 3) == -27"]),
    ("vowel_positions", "vowel_positions(s)", "returns the indices of the lower-case vowels in s",
     "    return [i for i, c in enumerate(s) if c in 'aeiou']",
     ["assert vowel_positions('banana') == [1, 3, 5]", "assert vowel_positions('xyz') == []", "assert vowel_positions('a') == [0]"]),
    ("dict_invert", "dict_invert(d)", "returns a dict mapping each value of d to its key (values are distinct)",
     "    return {v: k for k, v in d.items()}",
     ["assert dict_invert({'a': 1, 'b': 2}) == {1: 'a', 2: 'b'}", "assert dict_invert({}) == {}"]),
    ("digits_reversed", "digits_reversed(n)", "returns the non-negative integer n with its decimal digits reversed",
     "    return int(str(n)[::-1])",
     ["assert digits_reversed(123) == 321", "assert digits_reversed(1200) == 21", "assert digits_reversed(0) == 0"]),
    ("longest_word", "longest_word(s)", "returns the first longest space-separated word of s",
     "    best = ''\n    for w in s.split():\n        if len(w) > len(best):\n            best = w\n    return best",
     ["assert longest_word('a bbb cc ddd') == 'bbb'", "assert longest_word('one') == 'one'", "assert longest_word('') == ''"]),
    ("lcm", "lcm(a, b)", "returns the least common multiple of two positive integers",
     "    x, y = a, b\n    while y:\n        x, y = y, x % y\n    return a * b // x",
     ["assert lcm(4, 6) == 12", "assert lcm(7, 3) == 21", "assert lcm(5, 5) == 5"]),
    ("triangle_area", "triangle_area(base, height)", "returns the area of a triangle from its base and height",
     "    return base * height / 2",
     ["assert triangle_area(4, 3) == 6", "assert triangle_area(1, 1) == 0.5", "assert triangle_area(0, 9) == 0"]),
    ("count_upper", "count_upper(s)", "returns how many upper-case letters s holds",
     "    return sum(1 for c in s if c.isupper())",
     ["assert count_upper('Hello World') == 2", "assert count_upper('abc') == 0", "assert count_upper('ABC') == 3"]),
    ("nth_triangular", "nth_triangular(n)", "returns the n-th triangular number 1 + 2 + … + n",
     "    return n * (n + 1) // 2",
     ["assert nth_triangular(1) == 1", "assert nth_triangular(4) == 10", "assert nth_triangular(0) == 0"]),
]

SETTINGS = {
    "metric": "python_tests",
    "chat_template": True,
    "system": "You are a careful Python programmer. Answer with one ```python code block holding the function.",
    "max_new_tokens": 384,
    "timeout_s": 10,
}


def main() -> None:
    assert len(PROBLEMS) == 36
    (HERE / "tasks").mkdir(exist_ok=True)
    (HERE / "completions").mkdir(exist_ok=True)
    for split, problems in (("fitness", PROBLEMS[:24]), ("heldout", PROBLEMS[24:])):
        lines = [json.dumps({"settings": SETTINGS})]
        refs = []
        for entry, sig, what, body, tests in problems:
            prompt = f"Write a Python function `{sig}` that {what}."
            lines.append(json.dumps({"prompt": prompt, "tests": tests, "entry_point": entry}))
            refs.append(json.dumps({"completion": f"```python\ndef {sig}:\n{body}\n```"}))
        (HERE / "tasks" / f"code.{split}.jsonl").write_text("\n".join(lines) + "\n")
        (HERE / "completions" / f"reference.{split}.jsonl").write_text("\n".join(refs) + "\n")


if __name__ == "__main__":
    main()
