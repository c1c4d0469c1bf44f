// A small SVG plotting helper for `keel bench`: line charts with axes, ticks, legend and log-x.
#pragma once

// Design
// ------
// Just enough plotting for benchmark reports, with no dependency: a `chart` is a set of named
// line `series` over linear or logarithmic x, with optional horizontal reference lines (a rate
// limit, an ideal). `render` makes a standalone SVG 1.1 document (XML declaration, the SVG
// namespace, a white background, escaped text) that opens in any browser and passes
// `xmllint --noout`; `render_column` stacks several charts in one document, for small multiples
// that share an x range. Axes get "nice" ticks (1, 2, 2.5, 5 × 10^k) on linear scales and
// decades (with 2 and 5 between them when the range is short) on log scales; the legend sits to
// the right of the plot area so it never hides data.
//
// Example:
//
//     keel::cli::svg::chart c;
//     c.title = "Attempts per prompt";
//     c.x_label = "concurrency";
//     c.log_x = true;
//     c.lines.push_back({"keel", {{1, 1.0}, {64, 1.0}, {10000, 1.9}}});
//     keel::cli::svg::write_file("amplification.svg", keel::cli::svg::render(c));
//
// Thread safety: plain functions over values.

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keel::cli::svg {

/// One line of a chart.
struct series {
  /// Legend text.
  std::string name;
  /// The points, in drawing order (points with x <= 0 are skipped on a log x axis).
  std::vector<std::pair<double, double>> points;
  /// CSS colour; empty picks the next colour of the palette.
  std::string color;
  /// Dashed stroke.
  bool dashed = false;
  /// A dot at every point (for sparse data such as a concurrency sweep).
  bool markers = false;
};

/// A horizontal line across the plot (a limit, an ideal), drawn dotted and labelled.
struct reference_line {
  /// Its y value.
  double y = 0;
  /// Its label, drawn at the right end.
  std::string label;
};

/// A line chart.
struct chart {
  /// Title above the plot.
  std::string title;
  /// Label of the x axis.
  std::string x_label;
  /// Label of the y axis.
  std::string y_label;
  /// Logarithmic x axis.
  bool log_x = false;
  /// Axis limits; unset ones follow the data (y from 0 when all data are >= 0).
  std::optional<double> x_min, x_max, y_min, y_max;
  /// The lines.
  std::vector<series> lines;
  /// Reference lines.
  std::vector<reference_line> references;
  /// Size of the whole chart in pixels, legend included.
  int width = 820;
  /// Height in pixels.
  int height = 340;
};

/// The chart as a standalone SVG document.
std::string render(const chart& c);

/// Several charts stacked vertically in one SVG document, under a common title.
std::string render_column(const std::string& title, const std::vector<chart>& panels);

/// Linear ticks covering [lo, hi]: about `target` of them at 1, 2, 2.5 or 5 × 10^k.
std::vector<double> linear_ticks(double lo, double hi, int target);

/// Logarithmic ticks for [lo, hi] (lo > 0): every decade, plus 2 and 5 when there are few.
std::vector<double> log_ticks(double lo, double hi);

/// A tick label: "0.25", "10", "2k", "10k", "1.5M".
std::string format_tick(double v);

/// Escapes text for XML character data and attribute values.
std::string escape(std::string_view s);

/// Writes `text` to `path`.
/// @throws std::runtime_error naming the file if it cannot be written.
void write_file(const std::string& path, const std::string& text);

}  // namespace keel::cli::svg
