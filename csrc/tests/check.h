// csrc/tests/check.h — a minimal test harness for the C++ tests (no dependencies).
//
//   PYGEN_CHECK(cond, msg...)      record a failure (with file:line) and go on
//   PYGEN_CHECK_EQ(a, b)           same, printing both values
//   PYGEN_CHECK_NEAR(a, b, tol)    |a - b| <= tol (NaN fails)
//   return pygen_test::finish("name");   at the end of main: prints
//                                  "name: N passed, M failed", exit code 0/1
#pragma once
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>

namespace pygen_test {

inline int& passed() { static int n = 0; return n; }
inline int& failed() { static int n = 0; return n; }

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

inline void record(bool ok, const char* file, int line, const std::string& what) {
  if (ok) {
    ++passed();
  } else {
    ++failed();
    std::fprintf(stderr, "FAIL %s:%d: %s\n", file, line, what.c_str());
  }
}

inline int finish(const char* name) {
  std::printf("%s: %d passed, %d failed\n", name, passed(), failed());
  return failed() == 0 && passed() > 0 ? 0 : 1;
}

}  // namespace pygen_test

#define PYGEN_CHECK(cond, ...) \
  ::pygen_test::record(static_cast<bool>(cond), __FILE__, __LINE__, ::pygen_test::cat(#cond, " ", ##__VA_ARGS__))

#define PYGEN_CHECK_EQ(a, b)                                                                          \
  do {                                                                                                \
    const auto pygen_a_ = (a);                                                                        \
    const auto pygen_b_ = (b);                                                                        \
    ::pygen_test::record(pygen_a_ == pygen_b_, __FILE__, __LINE__,                                    \
                         ::pygen_test::cat(#a, " == ", #b, " (", pygen_a_, " vs ", pygen_b_, ")")); \
  } while (0)

#define PYGEN_CHECK_NEAR(a, b, tol)                                                                  \
  do {                                                                                               \
    const double pygen_a_ = static_cast<double>(a);                                                  \
    const double pygen_b_ = static_cast<double>(b);                                                  \
    ::pygen_test::record(std::fabs(pygen_a_ - pygen_b_) <= (tol), __FILE__, __LINE__,                \
                         ::pygen_test::cat(#a, " ~ ", #b, " (", pygen_a_, " vs ", pygen_b_,        \
                                           ", tol ", (tol), ")"));                                   \
  } while (0)
