// Strict JSON reading (declared in keel/llm/strict_json.hpp).
#include <keel/llm/strict_json.hpp>

#include <keel/llm/error.hpp>
#include <keel/llm/json_depth.hpp>

#include <memory>
#include <unordered_set>
#include <vector>

namespace keel::llm {
namespace {

using nlohmann::json;

struct duplicate_key {
  std::string pointer;
};

// A parser callback that throws duplicate_key for `{"id": "b", "id": "c"}`, tracking the JSON
// pointer of where the parser is. Containers nest at most max_json_depth deep (checked before
// parsing), so the stack is bounded.
class duplicate_key_finder {
 public:
  bool operator()(int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        element();
        frames_->push_back({true, {}, {}, 0});
        break;
      case json::parse_event_t::array_start:
        element();
        frames_->push_back({false, {}, {}, 0});
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        frames_->pop_back();
        break;
      case json::parse_event_t::key: {
        auto& top = frames_->back();
        top.key = parsed.get<std::string>();
        if (!top.keys.insert(top.key).second) {
          throw duplicate_key{pointer()};
        }
        break;
      }
      case json::parse_event_t::value:
        element();
        break;
    }
    return true;
  }

 private:
  struct frame {
    bool object;
    std::unordered_set<std::string> keys;
    std::string key;       // an object's current key
    std::size_t next = 0;  // an array's element count
  };

  void element() {
    if (!frames_->empty() && !frames_->back().object) {
      ++frames_->back().next;
    }
  }

  std::string pointer() const {
    std::string out;
    for (const auto& f : *frames_) {
      out += '/';
      if (!f.object) {
        out += std::to_string(f.next - 1);
        continue;
      }
      for (const char c : f.key) {
        out += c == '~' ? "~0" : c == '/' ? "~1" : std::string(1, c);
      }
    }
    return out;
  }

  // nlohmann copies the callback; the copies share one stack.
  std::shared_ptr<std::vector<frame>> frames_ = std::make_shared<std::vector<frame>>();
};

// nlohmann's description without its exception id and position (the caller gives the byte),
// and without "last read: '...'", which quotes the text (possibly an unterminated secret); what
// it expected is kept.
std::string parser_detail(const std::string& what) {
  std::string_view w = what;
  if (const auto col = w.find("column "); col != std::string_view::npos) {
    if (const auto colon = w.find(": ", col); colon != std::string_view::npos) {
      w.remove_prefix(colon + 2);
    }
  } else if (const auto bracket = w.find("] "); bracket != std::string_view::npos) {
    w.remove_prefix(bracket + 2);
  }
  std::string out(w);
  if (const auto last = out.find("; last read"); last != std::string::npos) {
    // What nlohmann expected is one of its token names; anything else after "; expected " is
    // part of the quoted text (which may hold "; expected " itself) and is dropped with it.
    static constexpr std::string_view tokens[] = {"true literal",
                                                  "false literal",
                                                  "null literal",
                                                  "string literal",
                                                  "number literal",
                                                  "'['",
                                                  "'{'",
                                                  "']'",
                                                  "'}'",
                                                  "':'",
                                                  "','",
                                                  "end of input",
                                                  "'[', '{', or a literal",
                                                  "unknown token",
                                                  "<parse error>",
                                                  "<uninitialized>"};
    constexpr std::string_view marker = "; expected ";
    const auto expected = out.rfind(marker);
    std::string tail;
    if (expected != std::string::npos && expected > last) {
      const std::string_view what_expected = std::string_view(out).substr(expected + marker.size());
      for (const std::string_view t : tokens) {
        if (what_expected == t) {
          tail = out.substr(expected);
        }
      }
    }
    out = out.substr(0, last) + tail;
  }
  return redact(out, 200);
}

}  // namespace

json parse_strict_json(std::string_view text) {
  if (const auto deep = json_too_deep_at(text); deep != std::string_view::npos) {
    throw json_refused(json_problem::too_deep, deep, {},
                       "nested deeper than " + std::to_string(max_json_depth) + " levels");
  }
  try {
    return json::parse(text.begin(), text.end(), duplicate_key_finder());
  } catch (const duplicate_key& d) {
    throw json_refused(json_problem::duplicate_key, 0, d.pointer,
                       "the key appears twice in one object (JSON parsers keep either value; "
                       "keel refuses to guess)");
  } catch (const json::parse_error& e) {
    // nlohmann's byte is the 1-based position of the byte it stopped at.
    throw json_refused(json_problem::syntax, e.byte > 0 ? e.byte - 1 : 0, {},
                       parser_detail(e.what()));
  } catch (const json::out_of_range& e) {
    // A number beyond a double (nlohmann's 406 "number overflow parsing '<the token>'"): found
    // in the text for its position, and not quoted (it may stand where a key belongs).
    const std::string_view what = e.what();
    const auto open = what.find("parsing '");
    const auto close = what.rfind('\'');
    std::size_t at = std::string_view::npos;
    if (e.id == 406 && open != std::string_view::npos && close > open + 9) {
      at = text.find(what.substr(open + 9, close - open - 9));
    }
    if (at == std::string_view::npos) {
      throw json_refused(json_problem::unusable, 0, {}, parser_detail(e.what()));
    }
    throw json_refused(json_problem::syntax, at, {}, "a number too large for a double");
  } catch (const json::exception& e) {
    throw json_refused(json_problem::unusable, 0, {}, parser_detail(e.what()));
  }
}

}  // namespace keel::llm
