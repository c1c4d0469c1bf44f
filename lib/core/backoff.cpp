// Backoff curves and jitter.
#include <keel/backoff.hpp>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string_view>

namespace keel {
namespace {

using ns = std::chrono::nanoseconds;
using fsec = std::chrono::duration<double, std::nano>;

ns to_ns(double nanos) noexcept {
  if (!(nanos > 0.0)) {  // also catches NaN
    return ns::zero();
  }
  if (nanos >= static_cast<double>(ns::max().count())) {
    return ns::max();
  }
  return ns(static_cast<ns::rep>(nanos));
}

}  // namespace

backoff backoff::constant(ns delay, keel::jitter j) {
  backoff b;
  b.shape = backoff_shape::constant;
  b.base = delay;
  b.cap = delay;
  b.jitter = j;
  return b;
}

backoff backoff::linear(ns base, ns cap, keel::jitter j) {
  backoff b;
  b.shape = backoff_shape::linear;
  b.base = base;
  b.cap = cap;
  b.jitter = j;
  return b;
}

backoff backoff::exponential(ns base, ns cap, keel::jitter j, double multiplier) {
  backoff b;
  b.shape = backoff_shape::exponential;
  b.base = base;
  b.cap = cap;
  b.jitter = j;
  b.multiplier = multiplier;
  return b;
}

backoff backoff::immediate() {
  return constant(ns::zero(), keel::jitter::none);
}

ns backoff::nominal_delay(int k) const noexcept {
  k = std::max(k, 1);
  const double b = static_cast<double>(base.count());
  double t = b;
  switch (shape) {
    case backoff_shape::constant:
      t = b;
      break;
    case backoff_shape::linear:
      t = b * k;
      break;
    case backoff_shape::exponential:
      // pow overflows to inf for large k, which the cap below absorbs.
      t = b * std::pow(multiplier, k - 1);
      break;
  }
  return std::min(cap, to_ns(t));
}

ns backoff::next_delay(int k, backoff_state& state, random_source& rng) const noexcept {
  if (first_retry_immediate) {
    if (k <= 1) {
      return ns::zero();
    }
    --k;
  }
  const ns t = nominal_delay(k);
  const double td = static_cast<double>(t.count());
  ns d = t;
  switch (jitter) {
    case keel::jitter::none:
      d = t;
      break;
    case keel::jitter::full:
      d = to_ns(rng.uniform() * td);
      break;
    case keel::jitter::equal:
      d = to_ns(td / 2 + rng.uniform() * (td / 2));
      break;
    case keel::jitter::decorrelated: {
      const double lo = static_cast<double>(base.count());
      const double prev =
          state.previous > ns::zero() ? static_cast<double>(state.previous.count()) : lo;
      const double hi = std::max(lo, prev * 3);
      d = std::min(cap, to_ns(lo + rng.uniform() * (hi - lo)));
      break;
    }
    case keel::jitter::decorrelated_v2: {
      // Polly's DecorrelatedJitterV2 (attempt counted from 0): t = n + U(0,1),
      // next = 2^t·tanh(sqrt(4t)); the delay is the increment scaled so its median tracks base·2^n.
      const double n = static_cast<double>(k - 1) + rng.uniform();
      if (n > 1000) {
        d = cap;
        break;
      }
      const double next = std::pow(2.0, n) * std::tanh(std::sqrt(4.0 * n));
      const double increment = next - state.v2_previous;
      state.v2_previous = next;
      d = std::min(cap, to_ns(increment * static_cast<double>(base.count()) / 1.4));
      break;
    }
  }
  state.previous = d;
  return d;
}

backoff_strategy& backoff_strategy::on(condition c, backoff b) {
  by_condition_.at(static_cast<std::size_t>(c)) = b;
  return *this;
}

backoff_strategy& backoff_strategy::select(selector s) {
  select_ = std::move(s);
  return *this;
}

backoff backoff_strategy::choose(const std::exception_ptr& ep, const classification& c) const {
  if (select_) {
    if (auto b = select_(ep, c)) {
      return *b;
    }
  }
  const auto i = static_cast<std::size_t>(c.condition);
  if (i < by_condition_.size() && by_condition_[i]) {
    return *by_condition_[i];
  }
  return default_;
}

backoff_strategy backoff_strategy::hierarchy() {
  using namespace std::chrono_literals;
  const backoff expo = backoff::exponential(1s, 60s, keel::jitter::full);
  backoff transient = expo;
  transient.first_retry_immediate = true;
  backoff_strategy s{expo};
  s.on(condition::throttled, expo).on(condition::timeout, expo).on(condition::transient, transient);
  return s;
}

namespace {
constexpr std::string_view shape_names[] = {"constant", "linear", "exponential"};
constexpr std::string_view jitter_names[] = {"none", "full", "equal", "decorrelated",
                                             "decorrelated_v2"};

template <class Enum, std::size_t N>
std::optional<Enum> find_name(const std::string_view (&names)[N], std::string_view name) {
  for (std::size_t i = 0; i < N; ++i) {
    if (names[i] == name) {
      return static_cast<Enum>(i);
    }
  }
  return std::nullopt;
}
}  // namespace

std::string_view to_string(backoff_shape s) noexcept {
  const auto i = static_cast<std::size_t>(s);
  return i < std::size(shape_names) ? shape_names[i] : std::string_view("unknown");
}

std::optional<backoff_shape> parse_backoff_shape(std::string_view name) noexcept {
  return find_name<backoff_shape>(shape_names, name);
}

std::string_view to_string(jitter j) noexcept {
  const auto i = static_cast<std::size_t>(j);
  return i < std::size(jitter_names) ? jitter_names[i] : std::string_view("unknown");
}

std::optional<jitter> parse_jitter(std::string_view name) noexcept {
  return find_name<jitter>(jitter_names, name);
}

}  // namespace keel
