defmodule Quichex.DevCert do
  @moduledoc """
  Self-signed certificates for development and tests, made with OTP's
  `:public_key` (no `openssl` needed). `mix quichex.gen.cert` writes one to
  disk; examples, benchmarks and tests call this module directly.

  The certificate has an ECDSA P-256 key and, by default, the subject
  alternative names `localhost`, `127.0.0.1` and `::1`, so a client can
  connect by name or by either loopback address. It is its own issuer: a
  client trusts it by loading the certificate itself as its CA,

      server = Quichex.Config.new(
        application_protos: ["echo"],
        load_cert_chain_from_pem_file: "priv/cert/selfsigned.pem",
        load_priv_key_from_pem_file: "priv/cert/selfsigned_key.pem"
      )

      client = Quichex.Config.new(
        application_protos: ["echo"],
        load_verify_locations_from_file: "priv/cert/selfsigned.pem"
      )

  Never use it in production: anyone with the key file can impersonate the
  names it lists, and nobody but you trusts it.

  ## Options

  Both `generate/1` and `write!/1` take:

    * `:hosts` - the names and IP addresses the certificate is valid for, a
      non-empty list of strings (default `["localhost", "127.0.0.1",
      "::1"]`). Strings that parse as IPv4 or IPv6 addresses become IP
      address SANs, the others DNS name SANs.
    * `:common_name` - the subject's common name (default: the first of
      `:hosts`).
    * `:days` - how long it is valid, from one day ago (to absorb clock
      skew), a positive integer (default 365).

  `write!/1` also takes:

    * `:output` - the path prefix of the two files (default
      `"priv/cert/selfsigned"`): the certificate goes to `<output>.pem`,
      the key to `<output>_key.pem` (mode 0600). Missing directories are
      created; existing files are overwritten.

  A bad option raises `ArgumentError` naming it.
  """

  require Record

  @hrl "public_key/include/public_key.hrl"
  for {name, tag} <- [
        {:otp_tbs_certificate, :OTPTBSCertificate},
        {:signature_algorithm, :SignatureAlgorithm},
        {:cert_validity, :Validity},
        {:otp_subject_public_key_info, :OTPSubjectPublicKeyInfo},
        {:public_key_algorithm, :PublicKeyAlgorithm},
        {:attribute_type_and_value, :AttributeTypeAndValue},
        {:extension, :Extension},
        {:basic_constraints, :BasicConstraints},
        {:authority_key_identifier, :AuthorityKeyIdentifier},
        {:ec_private_key, :ECPrivateKey},
        {:ec_point, :ECPoint}
      ] do
    Record.defrecordp(name, tag, Record.extract(tag, from_lib: @hrl))
  end

  @default_hosts ["localhost", "127.0.0.1", "::1"]
  @default_output "priv/cert/selfsigned"

  # OIDs (RFC 5280, RFC 5480, RFC 5758).
  @secp256r1 {1, 2, 840, 10045, 3, 1, 7}
  @id_ec_public_key {1, 2, 840, 10045, 2, 1}
  @ecdsa_with_sha256 {1, 2, 840, 10045, 4, 3, 2}
  @common_name {2, 5, 4, 3}
  @organization {2, 5, 4, 10}
  @subject_alt_name {2, 5, 29, 17}
  @basic_constraints {2, 5, 29, 19}
  @ext_key_usage {2, 5, 29, 37}
  @subject_key_identifier {2, 5, 29, 14}
  @authority_key_identifier {2, 5, 29, 35}
  @server_auth {1, 3, 6, 1, 5, 5, 7, 3, 1}
  @client_auth {1, 3, 6, 1, 5, 5, 7, 3, 2}

  @typedoc "A certificate and its key, PEM-encoded, and the certificate's DER."
  @type generated :: %{cert: binary(), key: binary(), der: binary()}

  @doc """
  Makes a certificate and its private key, in memory. Returns
  `%{cert: pem, key: pem, der: der}`: the certificate and the key
  (`EC PRIVATE KEY`) in PEM, and the certificate in DER. See the module
  documentation for the options.

      %{cert: "-----BEGIN CERTIFICATE-----" <> _, key: _key, der: _der} =
        Quichex.DevCert.generate(hosts: ["localhost", "127.0.0.1"])
  """
  @spec generate(keyword()) :: generated()
  def generate(opts \\ []) do
    opts = validate!(opts, [:hosts, :common_name, :days])
    key = :public_key.generate_key({:namedCurve, @secp256r1})
    ec_private_key(publicKey: point) = key
    key_id = :crypto.hash(:sha, point)

    name =
      {:rdnSequence,
       [[attr(@organization, "Quichex development")], [attr(@common_name, opts.common_name)]]}

    signature = signature_algorithm(algorithm: @ecdsa_with_sha256, parameters: :asn1_NOVALUE)

    tbs =
      otp_tbs_certificate(
        version: :v3,
        serialNumber: serial(),
        signature: signature,
        issuer: name,
        validity: validity(opts.days),
        subject: name,
        subjectPublicKeyInfo:
          otp_subject_public_key_info(
            algorithm:
              public_key_algorithm(
                algorithm: @id_ec_public_key,
                parameters: {:namedCurve, @secp256r1}
              ),
            subjectPublicKey: ec_point(point: point)
          ),
        extensions: extensions(opts.hosts, key_id)
      )

    der = :public_key.pkix_sign(tbs, key)

    %{
      cert: :public_key.pem_encode([{:Certificate, der, :not_encrypted}]),
      key: :public_key.pem_encode([:public_key.pem_entry_encode(:ECPrivateKey, key)]),
      der: der
    }
  end

  @doc """
  Makes a certificate with `generate/1` and writes it to `<output>.pem`
  and its key to `<output>_key.pem` (readable by the owner only). Returns
  the two paths; raises `File.Error` when a file cannot be written. See
  the module documentation for the options.

      %{cert: cert, key: key} = Quichex.DevCert.write!(output: "/tmp/quichex/dev")
      "/tmp/quichex/dev.pem" = cert
      "/tmp/quichex/dev_key.pem" = key
  """
  @spec write!(keyword()) :: %{cert: Path.t(), key: Path.t()}
  def write!(opts \\ []) do
    {output, opts} = Keyword.pop(keyword!(opts), :output, @default_output)
    paths = paths(output)
    store!(generate(opts), paths)
  end

  @doc false
  # Writes what generate/1 made to the two paths (for mix quichex.gen.cert).
  # The key file is created empty with mode 0600 before the key goes in, so
  # it is never readable by others, not even for a moment.
  def store!(generated, %{cert: cert_path, key: key_path} = paths) do
    File.mkdir_p!(Path.dirname(cert_path))
    File.mkdir_p!(Path.dirname(key_path))
    File.write!(key_path, "")
    File.chmod!(key_path, 0o600)
    File.write!(key_path, generated.key)
    File.write!(cert_path, generated.cert)
    paths
  end

  @doc """
  The two file names `write!/1` uses for an `:output` prefix. Raises
  `ArgumentError` for a prefix that is not a non-empty string.

      iex> Quichex.DevCert.paths("priv/cert/selfsigned")
      %{cert: "priv/cert/selfsigned.pem", key: "priv/cert/selfsigned_key.pem"}
  """
  @spec paths(Path.t()) :: %{cert: Path.t(), key: Path.t()}
  def paths(output) do
    unless is_binary(output) and output != "" and String.valid?(output) and
             not String.contains?(output, <<0>>) and not String.ends_with?(output, "/") do
      raise ArgumentError,
            "invalid value for option :output: expected a path prefix such as \"priv/cert/selfsigned\", got: #{inspect(output)}"
    end

    %{cert: output <> ".pem", key: output <> "_key.pem"}
  end

  @doc """
  The default `:output` prefix, `#{inspect(@default_output)}`.

      iex> Quichex.DevCert.default_output()
      "priv/cert/selfsigned"
  """
  @spec default_output() :: Path.t()
  def default_output, do: @default_output

  ## Helpers

  defp keyword!(opts) do
    unless is_list(opts) and Enum.all?(opts, &match?({key, _} when is_atom(key), &1)) do
      raise ArgumentError, "expected a keyword list of options, got: #{inspect(opts)}"
    end

    opts
  end

  defp validate!(opts, allowed) do
    opts = keyword!(opts)

    case Keyword.keys(opts) -- allowed do
      [] ->
        :ok

      [bad | _] ->
        raise ArgumentError, "unknown option #{inspect(bad)}, expected one of #{inspect(allowed)}"
    end

    hosts = Keyword.get(opts, :hosts, @default_hosts)

    unless is_list(hosts) and hosts != [] and Enum.all?(hosts, &host?/1) do
      raise ArgumentError,
            "invalid value for option :hosts: expected a non-empty list of host names or IP addresses (strings), got: #{inspect(hosts)}"
    end

    common_name = Keyword.get(opts, :common_name, hd(hosts))

    unless is_binary(common_name) and common_name != "" and byte_size(common_name) <= 64 and
             String.valid?(common_name) do
      raise ArgumentError,
            "invalid value for option :common_name: expected a string of 1..64 bytes, got: #{inspect(common_name)}"
    end

    days = Keyword.get(opts, :days, 365)

    unless is_integer(days) and days in 1..36_500 do
      raise ArgumentError,
            "invalid value for option :days: expected an integer in 1..36500, got: #{inspect(days)}"
    end

    %{hosts: hosts, common_name: common_name, days: days}
  end

  defp host?(host) when is_binary(host) do
    case ip(host) do
      {:ok, _ip} -> true
      :error -> dns_name?(host)
    end
  end

  defp host?(_host), do: false

  # A DNS name of letters, digits, hyphens and dots (a leading `*.` for a
  # wildcard), as a certificate may carry it.
  defp dns_name?(host) do
    byte_size(host) in 1..253 and
      Regex.match?(
        ~r/\A(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\z/,
        host
      )
  end

  defp ip(host) do
    case :inet.parse_strict_address(String.to_charlist(host)) do
      {:ok, ip} -> {:ok, ip}
      {:error, _} -> :error
    end
  end

  defp attr(type, value), do: attribute_type_and_value(type: type, value: {:utf8String, value})

  # A positive serial number of at most 20 octets (RFC 5280 4.1.2.2).
  defp serial do
    <<_::1, serial::unsigned-size(127)>> = :crypto.strong_rand_bytes(16)
    serial + 1
  end

  defp validity(days) do
    now = System.os_time(:second)
    from = now - 86_400
    to = now + days * 86_400
    cert_validity(notBefore: time(from), notAfter: time(to))
  end

  # UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 4.1.2.5).
  defp time(unix) do
    datetime = DateTime.from_unix!(unix)
    digits = Calendar.strftime(datetime, "%m%d%H%M%SZ")

    if datetime.year < 2050 do
      {:utcTime, String.to_charlist(Calendar.strftime(datetime, "%y") <> digits)}
    else
      {:generalTime, String.to_charlist(Calendar.strftime(datetime, "%Y") <> digits)}
    end
  end

  # A leaf (CA:FALSE) that is also its own trust anchor. It carries no key
  # usage extension on purpose: BoringSSL (quiche's TLS) accepts a
  # self-signed anchor only if it may sign certificates (no key usage, or
  # keyCertSign), and RFC 5280 allows keyCertSign only with CA:TRUE, which
  # verifiers such as rustls's webpki refuse for a server's own certificate.
  defp extensions(hosts, key_id) do
    san =
      for host <- hosts do
        case ip(host) do
          {:ok, ip} when tuple_size(ip) == 4 ->
            {:iPAddress, ip |> Tuple.to_list() |> :binary.list_to_bin()}

          {:ok, ip} ->
            {:iPAddress, for(part <- Tuple.to_list(ip), into: <<>>, do: <<part::16>>)}

          :error ->
            {:dNSName, String.to_charlist(host)}
        end
      end

    [
      extension(
        extnID: @basic_constraints,
        critical: true,
        extnValue: basic_constraints(cA: false)
      ),
      extension(extnID: @ext_key_usage, critical: false, extnValue: [@server_auth, @client_auth]),
      extension(extnID: @subject_key_identifier, critical: false, extnValue: key_id),
      extension(
        extnID: @authority_key_identifier,
        critical: false,
        extnValue: authority_key_identifier(keyIdentifier: key_id)
      ),
      extension(extnID: @subject_alt_name, critical: false, extnValue: san)
    ]
  end
end
