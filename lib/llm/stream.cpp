// The providers' stream decoders (declared in keel/llm/stream.hpp).
#include "wire_common.hpp"

#include <keel/llm/stream.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

namespace keel::llm {

using namespace detail;  // the shared wire helpers (wire_common.hpp)

namespace {

// A payload as a JSON object, or a reason it is not one ("" on success). Never throws but
// bad_alloc: parse_json catches parse errors and refuses deep nesting.
std::string parse_object(std::string_view text, json& out) {
  out = parse_json(text);
  if (out.is_discarded()) {
    return json_too_deep_at(text) != std::string_view::npos
               ? "nests deeper than " + std::to_string(max_json_depth) + " levels"
               : std::string("is not valid JSON");
  }
  if (!out.is_object()) {
    return "is not a JSON object";
  }
  return {};
}

// `obj[key]` if it is an object, else nullptr.
const json* object_at(const json& obj, const char* key) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_object() ? &*it : nullptr;
}

enum class field { absent, ok, bad };

// Reads an optional string field: absent or null gives `absent`, a non-string `bad`.
field string_at(const json& obj, const char* key, std::string& out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    return field::absent;
  }
  if (!it->is_string()) {
    return field::bad;
  }
  out = it->get_ref<const std::string&>();
  return field::ok;
}

// Reads an optional non-negative integer field.
field count_at(const json& obj, const char* key, long long& out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    return field::absent;
  }
  if (it->is_number_unsigned()) {
    const auto v = it->get<std::uint64_t>();
    if (v > static_cast<std::uint64_t>(std::numeric_limits<long long>::max())) {
      return field::bad;
    }
    out = static_cast<long long>(v);
    return field::ok;
  }
  if (!it->is_number_integer() || it->get<long long>() < 0) {
    return field::bad;
  }
  out = it->get<long long>();
  return field::ok;
}

// Empties a scratch vector between calls, so that a decoder does not keep the last chunk's
// events (up to a whole event's data each) alive while it waits for more bytes; a large array is
// given back too (keel aims at thousands of concurrent streams).
template <class T>
void release(std::vector<T>& v) {
  v.clear();
  if (v.capacity() > 16) {
    v.shrink_to_fit();
  }
}

// The message of an error payload ("message" or Bedrock's "Message").
std::string message_of(const json& obj) {
  std::string m;
  if (string_at(obj, "message", m) != field::ok) {
    string_at(obj, "Message", m);
  }
  return m;
}

}  // namespace

std::string_view to_string(stream_event_kind k) noexcept {
  switch (k) {
    case stream_event_kind::start:
      return "start";
    case stream_event_kind::text:
      return "text";
    case stream_event_kind::tool_call:
      return "tool_call";
    case stream_event_kind::finish:
      return "finish";
    case stream_event_kind::usage:
      return "usage";
    case stream_event_kind::done:
      return "done";
    case stream_event_kind::error:
      return "error";
  }
  return "unknown";
}

long long stream_decoder::tool_of_block(long long block) const noexcept {
  for (std::size_t i = 0; i < tool_blocks_.size(); ++i) {
    if (tool_blocks_[i] == block) {
      return static_cast<long long>(i);
    }
  }
  return -1;
}

std::string stream_decoder::tool_piece(long long block, tool_call piece, bool starts,
                                       std::vector<stream_event>& out) {
  if (block == answer_block_ ||
      (starts && answer_block_ < 0 && provider_ != provider_kind::openai &&
       piece.name == answer_tool_name && tool_of_block(block) < 0)) {
    answer_block_ = block;
    if (!piece.arguments.empty()) {
      answer_has_text_ = true;
      stream_event t(stream_event_kind::text);
      t.text = std::move(piece.arguments);
      out.push_back(std::move(t));
    }
    return {};
  }
  long long tool = tool_of_block(block);
  if (tool < 0) {
    if (!starts) {
      return "a tool-call piece for a block that did not start a tool call";
    }
    if (tool_blocks_.size() >= max_tool_calls) {
      return "more than " + std::to_string(max_tool_calls) + " tool calls";
    }
    tool_blocks_.push_back(block);
    tool_has_args_.push_back(false);
    tool = static_cast<long long>(tool_blocks_.size() - 1);
  } else if (piece.id.empty() && piece.name.empty() && piece.arguments.empty()) {
    return {};
  }
  stream_event t(stream_event_kind::tool_call);
  t.tool_index = static_cast<std::size_t>(tool);
  if (!piece.arguments.empty()) {
    tool_has_args_[t.tool_index] = true;
  }
  t.tool = std::move(piece);
  out.push_back(std::move(t));
  return {};
}

void stream_decoder::end_block(long long block, std::vector<stream_event>& out) {
  if (block == answer_block_ && !answer_has_text_) {
    answer_has_text_ = true;
    stream_event t(stream_event_kind::text);
    t.text = "{}";
    out.push_back(std::move(t));
    return;
  }
  const long long tool = tool_of_block(block);
  if (tool < 0 || tool_has_args_[static_cast<std::size_t>(tool)]) {
    return;
  }
  tool_has_args_[static_cast<std::size_t>(tool)] = true;
  stream_event t(stream_event_kind::tool_call);
  t.tool_index = static_cast<std::size_t>(tool);
  t.tool.arguments = "{}";
  out.push_back(std::move(t));
}

void stream_decoder::emit_error(std::vector<stream_event>& out, errc code,
                                std::string provider_code, std::string message) {
  provider_error_info info(opts_.http_status, std::string(to_string(provider_)),
                           std::move(provider_code), std::move(message));
  info.request_id = opts_.request_id;
  stream_event e(stream_event_kind::error);
  e.error.emplace(code, std::move(info));
  out.push_back(std::move(e));
  ended_ = true;
}

void stream_decoder::emit_done(std::vector<stream_event>& out) {
  out.emplace_back(stream_event_kind::done);
  ended_ = true;
}

std::unique_ptr<stream_decoder> make_stream_decoder(provider_kind kind, stream_options opts) {
  switch (kind) {
    case provider_kind::openai:
      return std::make_unique<openai_stream_decoder>(std::move(opts));
    case provider_kind::anthropic:
      return std::make_unique<anthropic_stream_decoder>(std::move(opts));
    case provider_kind::bedrock:
      return std::make_unique<bedrock_stream_decoder>(std::move(opts));
  }
  return std::make_unique<openai_stream_decoder>(std::move(opts));
}

std::vector<stream_event> events_of(const chat_response& reply) {
  std::vector<stream_event> out;
  out.reserve(5 + reply.tool_calls.size());
  stream_event& start = out.emplace_back(stream_event_kind::start);
  start.id = reply.id;
  start.model = reply.model;
  start.role = "assistant";
  if (!reply.text.empty()) {
    out.emplace_back().text = reply.text;
  }
  for (std::size_t i = 0; i < reply.tool_calls.size(); ++i) {
    stream_event& call = out.emplace_back(stream_event_kind::tool_call);
    call.tool = reply.tool_calls[i];
    call.tool_index = i;
  }
  out.emplace_back(stream_event_kind::finish).finish_reason = reply.finish_reason;
  out.emplace_back(stream_event_kind::usage).usage = reply.usage;
  out.emplace_back(stream_event_kind::done);
  return out;
}

// ---- SSE-based decoders ------------------------------------------------------------------

detail::sse_stream_decoder::sse_stream_decoder(provider_kind provider, stream_options opts,
                                               const char* end_name)
    : stream_decoder(provider, std::move(opts)), sse_(opts_.max_event_bytes), end_name_(end_name) {}

void detail::sse_stream_decoder::dispatch(std::vector<stream_event>& out) {
  for (const auto& e : events_) {
    if (ended_) {
      break;
    }
    on_event(e, out);
  }
  release(events_);
}

void detail::sse_stream_decoder::feed(std::string_view bytes, std::vector<stream_event>& out) {
  if (ended_) {
    return;  // after the end or an error: what follows is ignored, and never buffered
  }
  const bool ok = sse_.feed(bytes, events_);
  dispatch(out);
  if (!ok && !ended_) {
    emit_error(out, errc::malformed_response, "", sse_.error());
  }
}

void detail::sse_stream_decoder::finish(std::vector<stream_event>& out) {
  if (ended_) {
    return;
  }
  sse_.finish(events_);
  dispatch(out);
  if (!ended_) {
    emit_error(out, errc::transport, "", std::string("the stream ended before ") + end_name_);
  }
}

// ---- OpenAI -------------------------------------------------------------------------------

openai_stream_decoder::openai_stream_decoder(stream_options opts)
    : sse_stream_decoder(provider_kind::openai, std::move(opts), "data: [DONE]") {}

void openai_stream_decoder::on_event(const sse_event& e, std::vector<stream_event>& out) {
  if (e.data == "[DONE]") {
    emit_done(out);
    return;
  }
  json chunk;
  if (std::string why = parse_object(e.data, chunk); !why.empty()) {
    emit_error(out, errc::malformed_response, "", "stream data " + why);
    return;
  }
  if (const json* err = object_at(chunk, "error")) {
    std::string type;
    std::string code;
    string_at(*err, "type", type);
    string_at(*err, "code", code);
    const std::string msg = message_of(*err);
    // Without a status, the type names the failure; an unknown one mid-stream is the server's.
    auto is = [&](std::string_view s) { return code == s || type == s; };
    errc fallback = errc::server_error;
    if (is("rate_limit_exceeded") || type == "tokens" || type == "requests") {
      fallback = errc::rate_limited;
    } else if (is("invalid_request_error")) {
      fallback = errc::bad_request;
    } else if (is("timeout")) {
      fallback = errc::timeout;
    }
    emit_error(out, openai_error_code(code, type, msg, 0, fallback), code.empty() ? type : code,
               msg);
    return;
  }
  if (!started_) {
    stream_event s(stream_event_kind::start);
    string_at(chunk, "id", s.id);
    string_at(chunk, "model", s.model);
    // Azure OpenAI leads with a content-filter chunk of empty id and model and no choices: the
    // start (and the model it names) waits for the first chunk that says something.
    const auto choices = chunk.find("choices");
    const bool says_nothing = s.id.empty() && s.model.empty() &&
                              (choices == chunk.end() || (choices->is_array() && choices->empty()));
    if (!says_nothing) {
      started_ = true;
      s.role = "assistant";
      out.push_back(std::move(s));
    }
  }
  auto bad = [&](const std::string& path) {
    emit_error(out, errc::malformed_response, "", "stream chunk: " + path);
  };
  if (auto it = chunk.find("choices"); it != chunk.end() && !it->is_null()) {
    if (!it->is_array()) {
      return bad("choices is not an array");
    }
    for (const json& choice : *it) {
      if (!choice.is_object()) {
        return bad("choices[] is not an object");
      }
      long long index = 0;
      if (count_at(choice, "index", index) == field::bad) {
        return bad("choices[].index is not a non-negative integer");
      }
      if (index != 0) {
        continue;
      }
      if (auto d = choice.find("delta"); d != choice.end() && !d->is_null()) {
        if (!d->is_object()) {
          return bad("choices[0].delta is not an object");
        }
        std::string text;
        if (string_at(*d, "content", text) == field::bad) {
          return bad("choices[0].delta.content is not a string");
        }
        if (!text.empty()) {
          stream_event t(stream_event_kind::text);
          t.text = std::move(text);
          out.push_back(std::move(t));
        }
        if (auto calls = d->find("tool_calls"); calls != d->end() && !calls->is_null()) {
          if (!calls->is_array()) {
            return bad("choices[0].delta.tool_calls is not an array");
          }
          for (const json& c : *calls) {
            long long ti = 0;
            if (!c.is_object() || count_at(c, "index", ti) != field::ok) {
              return bad("choices[0].delta.tool_calls[] has no valid index");
            }
            tool_call piece;
            if (string_at(c, "id", piece.id) == field::bad) {
              return bad("choices[0].delta.tool_calls[].id is not a string");
            }
            if (auto fn = c.find("function"); fn != c.end() && !fn->is_null()) {
              if (!fn->is_object() || string_at(*fn, "name", piece.name) == field::bad ||
                  string_at(*fn, "arguments", piece.arguments) == field::bad) {
                return bad("choices[0].delta.tool_calls[].function is not an object of strings");
              }
            }
            // Any index may start a call: OpenAI-compatible servers number them as they like.
            if (std::string why = tool_piece(ti, std::move(piece), true, out); !why.empty()) {
              return bad("choices[0].delta.tool_calls[]: " + why);
            }
          }
        }
        std::string refusal;
        if (string_at(*d, "refusal", refusal) == field::bad) {
          return bad("choices[0].delta.refusal is not a string");
        }
        if (!refusal.empty()) {
          return emit_error(out, errc::content_filtered, "refusal", "the model refused");
        }
      }
      std::string reason;
      const field f = string_at(choice, "finish_reason", reason);
      if (f == field::bad) {
        return bad("choices[0].finish_reason is not a string");
      }
      if (f == field::ok) {
        stream_event fin(stream_event_kind::finish);
        fin.finish_reason = reason;
        out.push_back(std::move(fin));
        if (reason == "content_filter") {
          return emit_error(out, errc::content_filtered, "content_filter",
                            "finish_reason content_filter");
        }
      }
    }
  }
  if (auto it = chunk.find("usage"); it != chunk.end() && !it->is_null()) {
    if (!it->is_object()) {
      return bad("usage is not an object");
    }
    stream_event u(stream_event_kind::usage);
    if (count_at(*it, "prompt_tokens", u.usage.input) == field::bad ||
        count_at(*it, "completion_tokens", u.usage.output) == field::bad) {
      return bad("usage counts are not non-negative integers");
    }
    out.push_back(std::move(u));
  }
}

// ---- Anthropic ----------------------------------------------------------------------------

anthropic_stream_decoder::anthropic_stream_decoder(stream_options opts)
    : sse_stream_decoder(provider_kind::anthropic, std::move(opts), "message_stop") {}

void anthropic_stream_decoder::on_event(const sse_event& e, std::vector<stream_event>& out) {
  json ev;
  if (std::string why = parse_object(e.data, ev); !why.empty()) {
    emit_error(out, errc::malformed_response, "",
               "event " + (e.event.empty() ? std::string("(unnamed)") : e.event) + " data " + why);
    return;
  }
  std::string type;
  if (string_at(ev, "type", type) != field::ok) {
    type = e.event;
  }
  auto bad = [&](const std::string& what) {
    emit_error(out, errc::malformed_response, "", type + ": " + what);
  };
  // Reads `usage` into usage_ and reports it; false (after reporting) if it is malformed.
  auto read_usage = [&](const json& holder) {
    auto it = holder.find("usage");
    if (it == holder.end() || it->is_null()) {
      return true;
    }
    if (!it->is_object() || count_at(*it, "input_tokens", usage_.input) == field::bad ||
        count_at(*it, "output_tokens", usage_.output) == field::bad) {
      bad("usage is not an object of non-negative integers");
      return false;
    }
    stream_event u(stream_event_kind::usage);
    u.usage = usage_;
    out.push_back(std::move(u));
    return true;
  };
  if (type == "message_start") {
    const json* msg = object_at(ev, "message");
    if (msg == nullptr) {
      return bad("message is not an object");
    }
    stream_event s(stream_event_kind::start);
    if (string_at(*msg, "id", s.id) == field::bad ||
        string_at(*msg, "model", s.model) == field::bad ||
        string_at(*msg, "role", s.role) == field::bad) {
      return bad("message.id, model or role is not a string");
    }
    if (s.role.empty()) {
      s.role = "assistant";
    }
    out.push_back(std::move(s));
    read_usage(*msg);
  } else if (type == "content_block_start") {
    const json* block = object_at(ev, "content_block");
    if (block == nullptr) {
      return bad("content_block is not an object");
    }
    std::string block_type;
    std::string text;
    string_at(*block, "type", block_type);
    if (block_type == "tool_use") {
      long long index = 0;
      if (count_at(ev, "index", index) == field::bad) {
        return bad("index is not a non-negative integer");
      }
      tool_call piece;
      if (string_at(*block, "id", piece.id) == field::bad ||
          string_at(*block, "name", piece.name) == field::bad) {
        return bad("content_block.id or name is not a string");
      }
      if (std::string why = tool_piece(index, std::move(piece), true, out); !why.empty()) {
        return bad(why);
      }
    } else if (block_type == "text") {
      if (string_at(*block, "text", text) == field::bad) {
        return bad("content_block.text is not a string");
      }
      if (!text.empty()) {
        stream_event t(stream_event_kind::text);
        t.text = std::move(text);
        out.push_back(std::move(t));
      }
    }
  } else if (type == "content_block_delta") {
    const json* delta = object_at(ev, "delta");
    if (delta == nullptr) {
      return bad("delta is not an object");
    }
    std::string delta_type;
    string_at(*delta, "type", delta_type);
    if (delta_type == "input_json_delta") {
      long long index = 0;
      if (count_at(ev, "index", index) == field::bad) {
        return bad("index is not a non-negative integer");
      }
      tool_call piece;
      if (string_at(*delta, "partial_json", piece.arguments) == field::bad) {
        return bad("delta.partial_json is not a string");
      }
      if (std::string why = tool_piece(index, std::move(piece), false, out); !why.empty()) {
        return bad("input_json_delta: " + why);
      }
    } else if (delta_type == "text_delta") {
      std::string text;
      if (string_at(*delta, "text", text) != field::ok) {
        return bad("delta.text is not a string");
      }
      if (!text.empty()) {
        stream_event t(stream_event_kind::text);
        t.text = std::move(text);
        out.push_back(std::move(t));
      }
    }
  } else if (type == "message_delta") {
    std::string reason;
    field f = field::absent;
    if (const json* delta = object_at(ev, "delta")) {
      f = string_at(*delta, "stop_reason", reason);
    }
    if (f == field::bad) {
      return bad("delta.stop_reason is not a string");
    }
    if (f == field::ok) {
      stream_event fin(stream_event_kind::finish);
      fin.finish_reason = answered_finish_reason(reason, answer_block_ >= 0, !tool_blocks_.empty());
      out.push_back(std::move(fin));
    }
    if (!read_usage(ev)) {
      return;
    }
    if (reason == "refusal") {
      emit_error(out, errc::content_filtered, "refusal", "stop_reason refusal");
    }
  } else if (type == "content_block_stop") {
    long long index = 0;
    if (count_at(ev, "index", index) == field::bad) {
      return bad("index is not a non-negative integer");
    }
    end_block(index, out);
  } else if (type == "message_stop") {
    emit_done(out);
  } else if (type == "error") {
    const json* err = object_at(ev, "error");
    std::string err_type;
    std::string msg;
    if (err != nullptr) {
      string_at(*err, "type", err_type);
      msg = message_of(*err);
    }
    emit_error(out, anthropic_error_code(err_type, msg, errc::server_error), err_type, msg);
  }
  // ping and event types added after this was written: nothing to report.
}

// ---- Bedrock ------------------------------------------------------------------------------

bedrock_stream_decoder::bedrock_stream_decoder(stream_options opts)
    : stream_decoder(provider_kind::bedrock, std::move(opts)), frames_(opts_.max_message_bytes) {}

void bedrock_stream_decoder::feed(std::string_view bytes, std::vector<stream_event>& out) {
  if (ended_) {
    return;
  }
  const bool ok = frames_.feed(bytes, messages_);
  for (const auto& m : messages_) {
    if (ended_) {
      break;
    }
    on_message(m, out);
  }
  release(messages_);
  if (!ok && !ended_) {
    emit_error(out, errc::malformed_response, "", frames_.error());
  }
}

void bedrock_stream_decoder::finish(std::vector<stream_event>& out) {
  if (ended_) {
    return;
  }
  if (frames_.partial()) {
    emit_error(out, errc::transport, "", "the stream ended inside an event-stream message");
  } else if (!stopped_) {
    emit_error(out, errc::transport, "", "the stream ended before messageStop");
  } else {
    emit_done(out);
  }
}

void bedrock_stream_decoder::on_message(const event_stream_message& m,
                                        std::vector<stream_event>& out) {
  const std::string_view message_type = m.header(":message-type").value_or("");
  if (message_type == "exception") {
    const std::string type(m.header(":exception-type").value_or(""));
    json body;
    std::string msg;
    if (parse_object(m.payload, body).empty()) {
      msg = message_of(body);
    }
    emit_error(out, bedrock_error_code(type, msg, errc::server_error), type, msg);
    return;
  }
  if (message_type == "error") {
    const std::string code(m.header(":error-code").value_or(""));
    const std::string msg(m.header(":error-message").value_or(""));
    emit_error(out, bedrock_error_code(code, msg, errc::server_error), code, msg);
    return;
  }
  if (message_type != "event") {
    emit_error(out, errc::malformed_response, "",
               "event-stream message without a known :message-type");
    return;
  }
  const std::string event_type(m.header(":event-type").value_or(""));
  auto bad = [&](const std::string& what) {
    emit_error(out, errc::malformed_response, "", event_type + ": " + what);
  };
  json body;
  if (std::string why = parse_object(m.payload, body); !why.empty()) {
    return bad("payload " + why);
  }
  if (event_type == "messageStart") {
    stream_event s(stream_event_kind::start);
    if (string_at(body, "role", s.role) == field::bad) {
      return bad("role is not a string");
    }
    if (s.role.empty()) {
      s.role = "assistant";
    }
    out.push_back(std::move(s));
  } else if (event_type == "contentBlockStart") {
    const json* start = object_at(body, "start");
    const json* use = start != nullptr ? object_at(*start, "toolUse") : nullptr;
    if (use == nullptr) {
      return;  // a block type keel does not decode
    }
    long long index = 0;
    if (count_at(body, "contentBlockIndex", index) == field::bad) {
      return bad("contentBlockIndex is not a non-negative integer");
    }
    tool_call piece;
    if (string_at(*use, "toolUseId", piece.id) == field::bad ||
        string_at(*use, "name", piece.name) == field::bad) {
      return bad("start.toolUse.toolUseId or name is not a string");
    }
    if (std::string why = tool_piece(index, std::move(piece), true, out); !why.empty()) {
      return bad(why);
    }
  } else if (event_type == "contentBlockStop") {
    long long index = 0;
    if (count_at(body, "contentBlockIndex", index) == field::bad) {
      return bad("contentBlockIndex is not a non-negative integer");
    }
    end_block(index, out);
  } else if (event_type == "contentBlockDelta") {
    const json* delta = object_at(body, "delta");
    if (delta == nullptr) {
      return bad("delta is not an object");
    }
    if (const json* use = object_at(*delta, "toolUse")) {
      long long index = 0;
      if (count_at(body, "contentBlockIndex", index) == field::bad) {
        return bad("contentBlockIndex is not a non-negative integer");
      }
      tool_call piece;
      if (string_at(*use, "input", piece.arguments) == field::bad) {
        return bad("delta.toolUse.input is not a string");
      }
      if (std::string why = tool_piece(index, std::move(piece), false, out); !why.empty()) {
        return bad("delta.toolUse: " + why);
      }
      return;
    }
    std::string text;
    if (string_at(*delta, "text", text) == field::bad) {
      return bad("delta.text is not a string");
    }
    if (!text.empty()) {
      stream_event t(stream_event_kind::text);
      t.text = std::move(text);
      out.push_back(std::move(t));
    }
  } else if (event_type == "messageStop") {
    std::string reason;
    if (string_at(body, "stopReason", reason) == field::bad) {
      return bad("stopReason is not a string");
    }
    stopped_ = true;
    stream_event fin(stream_event_kind::finish);
    fin.finish_reason = answered_finish_reason(reason, answer_block_ >= 0, !tool_blocks_.empty());
    out.push_back(std::move(fin));
    if (reason == "content_filtered" || reason == "guardrail_intervened") {
      emit_error(out, errc::content_filtered, reason, "stopReason " + reason);
    }
  } else if (event_type == "metadata") {
    const json* usage = object_at(body, "usage");
    if (usage != nullptr) {
      stream_event u(stream_event_kind::usage);
      if (count_at(*usage, "inputTokens", u.usage.input) == field::bad ||
          count_at(*usage, "outputTokens", u.usage.output) == field::bad) {
        return bad("usage counts are not non-negative integers");
      }
      out.push_back(std::move(u));
    }
  }
  // Newer event types: nothing to report.
}

void stream_scrubber::feed(std::string_view piece, std::string& out) {
  held_.append(piece);
  // Whole secrets first; then the tail after the last replacement that could begin one.
  std::size_t safe_from = 0;
  for (const std::string& secret : secrets_) {
    if (secret.empty()) {
      continue;
    }
    for (auto at = held_.find(secret); at != std::string::npos;
         at = held_.find(secret, at + marker_.size())) {
      held_.replace(at, secret.size(), marker_);
      safe_from = std::max(safe_from, at + marker_.size());
    }
  }
  std::size_t hold = 0;
  for (const std::string& secret : secrets_) {
    const std::size_t most =
        std::min(secret.size() - (secret.empty() ? 0 : 1), held_.size() - safe_from);
    for (std::size_t k = most; k > hold; --k) {
      if (std::string_view(held_).substr(held_.size() - k) ==
          std::string_view(secret).substr(0, k)) {
        hold = k;
        break;
      }
    }
  }
  out.append(held_, 0, held_.size() - hold);
  held_.erase(0, held_.size() - hold);
}

void stream_scrubber::finish(std::string& out) {
  out += held_;
  held_.clear();
}

}  // namespace keel::llm
