// The SVG plotting helper of `keel bench` (see svg.hpp).
#include "svg.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <stdexcept>

namespace keel::cli::svg {

namespace {

// Okabe-Ito: distinguishable with the common colour-vision deficiencies, readable on white.
constexpr const char* palette[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7",
                                   "#E69F00", "#56B4E9", "#000000", "#7F7F7F"};
constexpr int margin_left = 72;
constexpr int margin_right = 200;  // room for the legend
constexpr int margin_top = 34;
constexpr int margin_bottom = 50;
constexpr int column_title_height = 36;

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

struct axis_range {
  double lo = 0;
  double hi = 1;
  std::vector<double> ticks;
};

// A step of 1, 2, 2.5 or 5 × 10^k giving about `target` intervals over `span`.
double nice_step(double span, int target) {
  const double raw = span / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double norm = raw / mag;
  const double f = norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10;
  return f * mag;
}

axis_range linear_axis(double lo, double hi, bool fixed_lo, bool fixed_hi, int target) {
  if (!(hi > lo)) {
    const double pad = lo == 0 ? 1 : std::fabs(lo) * 0.1;
    if (!fixed_lo) {
      lo -= fixed_hi ? 2 * pad : pad;
    }
    if (!fixed_hi || !(hi > lo)) {
      hi = lo + 2 * pad;
    }
  }
  const double step = nice_step(hi - lo, target);
  axis_range r;
  r.lo = fixed_lo ? lo : std::floor(lo / step + 1e-9) * step;
  r.hi = fixed_hi ? hi : std::ceil(hi / step - 1e-9) * step;
  r.ticks = linear_ticks(r.lo, r.hi, target);
  return r;
}

axis_range log_axis(double lo, double hi, bool fixed_lo, bool fixed_hi) {
  if (!(lo > 0)) {
    lo = 1;
  }
  if (!(hi > lo)) {
    hi = lo * 10;
  }
  axis_range r;
  r.lo = fixed_lo ? lo : std::pow(10.0, std::floor(std::log10(lo) + 1e-9));
  r.hi = fixed_hi ? hi : std::pow(10.0, std::ceil(std::log10(hi) - 1e-9));
  if (!(r.hi > r.lo)) {
    r.hi = r.lo * 10;
  }
  r.ticks = log_ticks(r.lo, r.hi);
  return r;
}

// Draws one chart at (ox, oy) of a document; `clip_id` numbers the clip paths of the document.
void draw_chart(std::string& out, const chart& c, int ox, int oy, int& clip_id) {
  const double px0 = margin_left;
  const double px1 = c.width - margin_right;
  const double py0 = margin_top;
  const double py1 = c.height - margin_bottom;

  // Data ranges.
  double xlo = std::numeric_limits<double>::infinity();
  double xhi = -xlo;
  double ylo = xlo;
  double yhi = -xlo;
  for (const auto& s : c.lines) {
    for (const auto& [x, y] : s.points) {
      if (!std::isfinite(x) || !std::isfinite(y) || (c.log_x && x <= 0)) {
        continue;
      }
      xlo = std::min(xlo, x);
      xhi = std::max(xhi, x);
      ylo = std::min(ylo, y);
      yhi = std::max(yhi, y);
    }
  }
  for (const auto& r : c.references) {
    ylo = std::min(ylo, r.y);
    yhi = std::max(yhi, r.y * 1.08);  // leave room for the label
  }
  const bool empty = !std::isfinite(xlo);
  if (empty) {
    xlo = c.log_x ? 1 : 0;
    xhi = c.log_x ? 10 : 1;
    ylo = 0;
    yhi = 1;
  }
  if (ylo >= 0) {
    ylo = 0;
  }
  xlo = c.x_min.value_or(xlo);
  xhi = c.x_max.value_or(xhi);
  ylo = c.y_min.value_or(ylo);
  yhi = c.y_max.value_or(yhi);
  const axis_range xr = c.log_x
                            ? log_axis(xlo, xhi, c.x_min.has_value(), c.x_max.has_value())
                            : linear_axis(xlo, xhi, c.x_min.has_value(), c.x_max.has_value(), 8);
  const axis_range yr = linear_axis(ylo, yhi, c.y_min.has_value(), c.y_max.has_value(), 5);

  auto fx = [&](double x) { return c.log_x ? std::log10(x) : x; };
  auto X = [&](double x) {
    return px0 + (fx(x) - fx(xr.lo)) / (fx(xr.hi) - fx(xr.lo)) * (px1 - px0);
  };
  auto Y = [&](double y) { return py1 - (y - yr.lo) / (yr.hi - yr.lo) * (py1 - py0); };

  out += "<g transform=\"translate(" + std::to_string(ox) + "," + std::to_string(oy) + ")\">\n";
  if (!c.title.empty()) {
    out += "<text x=\"" + num(px0) + "\" y=\"20\" font-size=\"14\" font-weight=\"bold\">" +
           escape(c.title) + "</text>\n";
  }
  // Grid and ticks.
  out += "<g stroke=\"#e3e3e3\" stroke-width=\"1\">\n";
  for (double t : xr.ticks) {
    out += "<line x1=\"" + num(X(t)) + "\" y1=\"" + num(py0) + "\" x2=\"" + num(X(t)) + "\" y2=\"" +
           num(py1) + "\"/>\n";
  }
  for (double t : yr.ticks) {
    out += "<line x1=\"" + num(px0) + "\" y1=\"" + num(Y(t)) + "\" x2=\"" + num(px1) + "\" y2=\"" +
           num(Y(t)) + "\"/>\n";
  }
  out += "</g>\n";
  out += "<rect x=\"" + num(px0) + "\" y=\"" + num(py0) + "\" width=\"" + num(px1 - px0) +
         "\" height=\"" + num(py1 - py0) + "\" fill=\"none\" stroke=\"#888888\"/>\n";
  out += "<g font-size=\"11\" fill=\"#333333\">\n";
  for (double t : xr.ticks) {
    out += "<text x=\"" + num(X(t)) + "\" y=\"" + num(py1 + 15) + "\" text-anchor=\"middle\">" +
           escape(format_tick(t)) + "</text>\n";
  }
  for (double t : yr.ticks) {
    out += "<text x=\"" + num(px0 - 6) + "\" y=\"" + num(Y(t) + 4) + "\" text-anchor=\"end\">" +
           escape(format_tick(t)) + "</text>\n";
  }
  out += "</g>\n";
  // Axis labels.
  if (!c.x_label.empty()) {
    out += "<text x=\"" + num((px0 + px1) / 2) + "\" y=\"" + num(c.height - 12.0) +
           "\" text-anchor=\"middle\">" + escape(c.x_label) + "</text>\n";
  }
  if (!c.y_label.empty()) {
    const double cy = (py0 + py1) / 2;
    out += "<text x=\"16\" y=\"" + num(cy) +
           "\" text-anchor=\"middle\" transform=\"rotate(-90 16 " + num(cy) + ")\">" +
           escape(c.y_label) + "</text>\n";
  }
  if (empty) {
    out += "<text x=\"" + num((px0 + px1) / 2) + "\" y=\"" + num((py0 + py1) / 2) +
           "\" text-anchor=\"middle\" fill=\"#888888\">no data</text>\n";
  }

  // Data, clipped to the plot area.
  const std::string clip = "clip" + std::to_string(clip_id++);
  out += "<clipPath id=\"" + clip + "\"><rect x=\"" + num(px0) + "\" y=\"" + num(py0) +
         "\" width=\"" + num(px1 - px0) + "\" height=\"" + num(py1 - py0) + "\"/></clipPath>\n";
  out += "<g clip-path=\"url(#" + clip + ")\">\n";
  for (const auto& r : c.references) {
    out += "<line x1=\"" + num(px0) + "\" y1=\"" + num(Y(r.y)) + "\" x2=\"" + num(px1) +
           "\" y2=\"" + num(Y(r.y)) +
           "\" stroke=\"#555555\" stroke-width=\"1.2\" stroke-dasharray=\"2,3\"/>\n";
    out += "<text x=\"" + num(px1 - 4) + "\" y=\"" + num(Y(r.y) - 4) +
           "\" text-anchor=\"end\" font-size=\"11\" fill=\"#555555\">" + escape(r.label) +
           "</text>\n";
  }
  std::vector<std::string> colors;
  std::size_t next_color = 0;
  for (const auto& s : c.lines) {
    const std::string color =
        s.color.empty() ? palette[next_color++ % std::size(palette)] : s.color;
    colors.push_back(color);
    std::string pts;
    for (const auto& [x, y] : s.points) {
      if (!std::isfinite(x) || !std::isfinite(y) || (c.log_x && x <= 0)) {
        continue;
      }
      pts += (pts.empty() ? "" : " ") + num(X(x)) + "," + num(Y(y));
    }
    if (!pts.empty()) {
      out += "<polyline fill=\"none\" stroke=\"" + color +
             "\" stroke-width=\"1.8\" stroke-linejoin=\"round\"" +
             (s.dashed ? " stroke-dasharray=\"6,4\"" : "") + " points=\"" + pts + "\"/>\n";
    }
    if (s.markers) {
      for (const auto& [x, y] : s.points) {
        if (!std::isfinite(x) || !std::isfinite(y) || (c.log_x && x <= 0)) {
          continue;
        }
        out += "<circle cx=\"" + num(X(x)) + "\" cy=\"" + num(Y(y)) + "\" r=\"3\" fill=\"" + color +
               "\"/>\n";
      }
    }
  }
  out += "</g>\n";

  // Legend, right of the plot.
  double ly = py0 + 8;
  for (std::size_t i = 0; i < c.lines.size(); ++i) {
    const auto& s = c.lines[i];
    const double lx = px1 + 14;
    out += "<line x1=\"" + num(lx) + "\" y1=\"" + num(ly) + "\" x2=\"" + num(lx + 24) + "\" y2=\"" +
           num(ly) + "\" stroke=\"" + colors[i] + "\" stroke-width=\"2.5\"" +
           (s.dashed ? " stroke-dasharray=\"6,4\"" : "") + "/>\n";
    if (s.markers) {
      out += "<circle cx=\"" + num(lx + 12) + "\" cy=\"" + num(ly) + "\" r=\"3\" fill=\"" +
             colors[i] + "\"/>\n";
    }
    out += "<text x=\"" + num(lx + 30) + "\" y=\"" + num(ly + 4) + "\">" + escape(s.name) +
           "</text>\n";
    ly += 18;
  }
  out += "</g>\n";
}

std::string document(int width, int height, const std::string& title, const std::string& body) {
  std::string out = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  out += "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"" +
         std::to_string(width) + "\" height=\"" + std::to_string(height) + "\" viewBox=\"0 0 " +
         std::to_string(width) + " " + std::to_string(height) +
         "\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n";
  out += "<title>" + escape(title) + "</title>\n";
  out += "<rect x=\"0\" y=\"0\" width=\"" + std::to_string(width) + "\" height=\"" +
         std::to_string(height) + "\" fill=\"#ffffff\"/>\n";
  out += body;
  out += "</svg>\n";
  return out;
}

}  // namespace

std::vector<double> linear_ticks(double lo, double hi, int target) {
  std::vector<double> out;
  if (!(hi > lo) || !std::isfinite(lo) || !std::isfinite(hi)) {
    out.push_back(lo);
    return out;
  }
  const double step = nice_step(hi - lo, target);
  for (double t = std::ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9; t += step) {
    out.push_back(std::fabs(t) < step * 1e-9 ? 0.0 : t);
    if (out.size() > 1000) {
      break;
    }
  }
  return out;
}

std::vector<double> log_ticks(double lo, double hi) {
  std::vector<double> out;
  if (!(lo > 0) || !(hi > lo)) {
    out.push_back(lo);
    return out;
  }
  const int d0 = static_cast<int>(std::floor(std::log10(lo) + 1e-9));
  const int d1 = static_cast<int>(std::ceil(std::log10(hi) - 1e-9));
  const bool minor = d1 - d0 <= 3;
  for (int d = d0; d <= d1; ++d) {
    const double base = std::pow(10.0, d);
    for (double m : {1.0, 2.0, 5.0}) {
      if (m != 1.0 && !minor) {
        continue;
      }
      const double t = base * m;
      if (t >= lo * (1 - 1e-9) && t <= hi * (1 + 1e-9)) {
        out.push_back(t);
      }
    }
  }
  return out;
}

std::string format_tick(double v) {
  char buf[32];
  const double a = std::fabs(v);
  if (a < 1e-12) {
    return "0";
  }
  if (a >= 1e6) {
    std::snprintf(buf, sizeof buf, "%.4gM", v / 1e6);
  } else if (a >= 1e3) {
    std::snprintf(buf, sizeof buf, "%.4gk", v / 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%.4g", v);
  }
  return buf;
}

std::string escape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    switch (ch) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        // XML 1.0 forbids most control characters even when escaped.
        if (static_cast<unsigned char>(ch) < 0x20 && ch != '\n' && ch != '\t') {
          out += ' ';
        } else {
          out += ch;
        }
    }
  }
  return out;
}

std::string render(const chart& c) {
  std::string body;
  int clip_id = 0;
  draw_chart(body, c, 0, 0, clip_id);
  return document(c.width, c.height, c.title, body);
}

std::string render_column(const std::string& title, const std::vector<chart>& panels) {
  int width = 0;
  int height = title.empty() ? 0 : column_title_height;
  std::string body;
  if (!title.empty()) {
    body += "<text x=\"" + std::to_string(margin_left) +
            "\" y=\"24\" font-size=\"16\" font-weight=\"bold\">" + escape(title) + "</text>\n";
  }
  int clip_id = 0;
  for (const auto& p : panels) {
    draw_chart(body, p, 0, height, clip_id);
    height += p.height;
    width = std::max(width, p.width);
  }
  return document(std::max(width, 200), std::max(height, 100), title, body);
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  f.close();
  if (!f) {
    throw std::runtime_error("cannot write " + path);
  }
}

}  // namespace keel::cli::svg
