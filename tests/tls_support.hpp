// Test certificates made in memory: a private CA, server certificates it signs, the CA as a PEM
// file.
#pragma once

#include <boost/asio/ssl/context.hpp>
#include <catch2/catch.hpp>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <unistd.h>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

namespace keel_test {

/// Frees an EVP_PKEY.
struct pkey_deleter {
  /// Frees `p`.
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
/// Frees an X509.
struct x509_deleter {
  /// Frees `p`.
  void operator()(X509* p) const { X509_free(p); }
};
/// An owned key.
using pkey_ptr = std::unique_ptr<EVP_PKEY, pkey_deleter>;
/// An owned certificate.
using x509_ptr = std::unique_ptr<X509, x509_deleter>;

/// Adds the X.509v3 extension `nid` with `value` to `cert`.
inline void add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX v3;
  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &v3, nid, value);
  REQUIRE(ext != nullptr);
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

/// A certificate for `cn` with public key `key`, signed by `issuer_key` (self-signed when
/// `issuer` is null); a server certificate names `san` (subjectAltName).
inline x509_ptr make_cert(EVP_PKEY* key, const char* cn, X509* issuer, EVP_PKEY* issuer_key,
                          bool ca, long serial, const char* san = "DNS:localhost,IP:127.0.0.1") {
  x509_ptr cert(X509_new());
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 24 * 3600);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn),
                             -1, -1, 0);
  X509* signer = issuer ? issuer : cert.get();
  X509_set_issuer_name(cert.get(), X509_get_subject_name(signer));
  if (ca) {
    add_ext(cert.get(), signer, NID_basic_constraints, "critical,CA:TRUE");
    add_ext(cert.get(), signer, NID_key_usage, "critical,keyCertSign,cRLSign");
    add_ext(cert.get(), signer, NID_subject_key_identifier, "hash");
  } else {
    add_ext(cert.get(), signer, NID_basic_constraints, "CA:FALSE");
    add_ext(cert.get(), signer, NID_subject_alt_name, san);
    add_ext(cert.get(), signer, NID_ext_key_usage, "serverAuth");
  }
  REQUIRE(X509_sign(cert.get(), issuer_key, EVP_sha256()) > 0);
  return cert;
}

/// A test CA, a server certificate it signed (for `san`, by default localhost and 127.0.0.1),
/// a server TLS context using it, and the CA in a PEM file (removed at destruction).
struct test_pki {
  /// Makes the keys, certificates, PEM file and server context.
  explicit test_pki(const char* san = "DNS:localhost,IP:127.0.0.1") {
    static int counter = 0;
    ca_key.reset(EVP_EC_gen("P-256"));
    server_key.reset(EVP_EC_gen("P-256"));
    REQUIRE(ca_key);
    REQUIRE(server_key);
    ca = make_cert(ca_key.get(), "keel test CA", nullptr, ca_key.get(), true, 1);
    server = make_cert(server_key.get(), "localhost", ca.get(), ca_key.get(), false, 2, san);
    ca_file =
        (std::filesystem::temp_directory_path() /
         ("keel_test_ca_" + std::to_string(::getpid()) + "_" + std::to_string(++counter) + ".pem"))
            .string();
    FILE* f = std::fopen(ca_file.c_str(), "w");
    REQUIRE(f != nullptr);
    PEM_write_X509(f, ca.get());
    std::fclose(f);
    // The server's certificate and key as PEM too, for servers started as processes.
    server_cert_file = ca_file.substr(0, ca_file.size() - 4) + "_server.pem";
    server_key_file = ca_file.substr(0, ca_file.size() - 4) + "_server_key.pem";
    f = std::fopen(server_cert_file.c_str(), "w");
    REQUIRE(f != nullptr);
    PEM_write_X509(f, server.get());
    std::fclose(f);
    f = std::fopen(server_key_file.c_str(), "w");
    REQUIRE(f != nullptr);
    PEM_write_PrivateKey(f, server_key.get(), nullptr, nullptr, 0, nullptr, nullptr);
    std::fclose(f);
    server_ctx.set_options(boost::asio::ssl::context::default_workarounds);
    REQUIRE(SSL_CTX_use_certificate(server_ctx.native_handle(), server.get()) == 1);
    REQUIRE(SSL_CTX_use_PrivateKey(server_ctx.native_handle(), server_key.get()) == 1);
  }
  ~test_pki() {
    std::filesystem::remove(ca_file);
    std::filesystem::remove(server_cert_file);
    std::filesystem::remove(server_key_file);
  }
  test_pki(const test_pki&) = delete;
  test_pki& operator=(const test_pki&) = delete;

  /// The CA's and the server's keys.
  pkey_ptr ca_key, server_key;
  /// The CA's and the server's certificates.
  x509_ptr ca, server;
  /// The CA certificate as PEM.
  std::string ca_file;
  /// The server's certificate and private key as PEM.
  std::string server_cert_file, server_key_file;
  /// A server context presenting `server`.
  boost::asio::ssl::context server_ctx{boost::asio::ssl::context::tls_server};
};

}  // namespace keel_test
